"""Type stubs for the compiled module built from cpp/module.cc."""

from typing import TypedDict

import numpy as np

INPUT_NAME: str
OUTPUT_NAME: str

class ServerStats(TypedDict):
    requests: int
    errors: int
    infer_requests: int
    rows: int
    in_flight: int
    mean_latency_us: float
    p50_latency_us: float
    p99_latency_us: float

class LoadResult(TypedDict):
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    first_error: str

class DirectServer:
    """KServe v2 GRPCInferenceService over a factorization-machine CTR model.

    Requests run on gRPC's C++ threads; no method here is called on the request path. Blocking
    methods release the GIL.
    """

    def __init__(self) -> None: ...
    def load_model(self, path: str, name: str, version: str = "1") -> None:
        """Loads (or hot-swaps) the model file; ValueError when the file is not a valid model."""
    def start(self, address: str, workers: int = 2) -> int:
        """Listens on host:port (port 0: any free port) with up to `workers` polling threads.

        Returns the bound port; RuntimeError when already started or the address cannot be bound.
        """
    def stop(self, grace_s: float = 5.0) -> None:
        """Stops listening, waits up to grace_s for in-flight RPCs, cancels the rest. Idempotent."""
    def stats(self) -> ServerStats: ...
    def latency_buckets(self, bounds_us: list[int]) -> tuple[list[int], int]:
        """RPCs faster than each bound (cumulative), then all RPCs; and the latency sum (us)."""
    @property
    def running(self) -> bool: ...
    @property
    def port(self) -> int: ...
    @property
    def model_name(self) -> str: ...

def run_load(address: str, request: bytes, concurrency: int, duration_s: float) -> LoadResult:
    """C++ load generator: `concurrency` threads send one serialized ModelInferRequest back to back."""

class CallStats(TypedDict):
    codes: dict[int, int]  # status code -> requests C++ answered with it
    buckets: list[int]  # non-cumulative, one past the last bound
    latency_s: float
    in_flight: int
    relayed: int  # calls handed to the Python server
    retried: int  # extra attempts on another replica

class RelayServer:
    """What the C++ fast paths share (cpp/relay.h): a server on the public port that answers one
    method's calls it can and relays everything else to the Python server at `fallback`."""

    def start(self, address: str, fallback: str) -> int:
        """Listens on host:port (port 0: any free port); returns the bound port."""
    def stop(self, grace_s: float = 5.0) -> None:
        """Stops listening, lets in-flight calls finish for up to grace_s. Idempotent."""
    def stats(self) -> CallStats:
        """Counts of the calls answered here (relayed ones are Python's to count)."""

class Forwarder(RelayServer):
    """The proxy's ModelInfer forwarder (cpp/forwarder.h): forwards on gRPC's C++ threads,
    relays everything else to the Python server at `fallback`. Blocking methods release the GIL."""

    def __init__(self, latency_bounds_s: list[float], attempts: int = 3) -> None: ...
    def set_table(
        self,
        model: str,
        version: str,
        replicas: list[tuple[str, str, str, int]],
        inputs: list[tuple[str, str, list[int], int]],
        sample_ratio: float,
    ) -> None:
        """replicas: (name, address, infer method, capacity); inputs: (name, datatype, shape, itemsize)."""
    def in_flight_on(self, name: str) -> int: ...

class ShardStats(TypedDict):
    lookups: int
    hedges: int  # the extra load
    hedge_wins: int
    retries: int
    hedge_delay_ms: float  # p95 of the shard's fastest replica
    p50_ms: dict[str, float]  # by replica

class ShardRouter(RelayServer):
    """The sharded router's C++ fast path (cpp/shard_router.h): splits a batch by owner, looks the
    keys up on the shards (P2C, retries, hedges), merges, answers; relays everything else to the
    Python server at `fallback`. Blocking methods release the GIL."""

    def __init__(
        self, latency_bounds_s: list[float], attempts: int, hedge_default_s: float, hedge_budget: float
    ) -> None: ...
    def set_table(
        self,
        model: str,
        version: str,
        inputs: list[tuple[str, str, list[int], int]],
        key_input: str,
        output: str,
        partitioning: str,
        bounds: list[int],
        num_rows: int,
        fields: int,
        dim: int,
        bias: float,
        shards: list[list[tuple[str, str, int]]],
        method: str,
        sample_ratio: float,
        enabled: bool,
    ) -> None:
        """shards[i]: (name, address, capacity) of shard i's replicas; enabled=False: relay all."""
    def set_hedge_budget(self, budget: float) -> None: ...
    @property
    def hedge_budget(self) -> float: ...
    def owners(self, keys: list[int]) -> list[int]: ...
    def shard_stats(self) -> list[ShardStats]: ...

class ShardServer(RelayServer):
    """A shard replica's lookup fast path (cpp/shard_server.h): gathers the rows of the keys it
    holds from the part's arrays (kept alive by the server), relays the rest to Python."""

    def __init__(
        self,
        latency_bounds_s: list[float],
        method: str,
        name: str,
        capacity: int,
        linear: np.ndarray,
        factors: np.ndarray,
        keys: np.ndarray,
        lo: int,
        sample_ratio: float,
    ) -> None:
        """linear float32 [rows], factors float32 [rows, dim], keys int64 [rows] (hash) or empty
        (range: global key lo is row 0); C-contiguous, not converted."""
    def set_enabled(self, on: bool) -> None:
        """Off: every lookup goes to Python."""

def fm_scores(bias: float, fields: int, dim: int, rows: bytes) -> bytes:
    """Scores of float32 rows [batch * fields, 1 + dim] (each id's row), in numpy's float32 order."""
