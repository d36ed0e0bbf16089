"""How a ``kind: sharded`` app's table is split, and the part of it one shard actor holds.

Pure logic, no Ray and no gRPC: the master names layouts, shard actors open their :class:`ShardPart`,
the router splits each batch with :meth:`Layout.split` and merges with :func:`merge_ctr`.

- **range**: shard ``i`` owns the contiguous keys ``[i * rows // N, (i + 1) * rows // N)``. A shard
  memory-maps exactly its slice of the table file, so nothing is copied or rebuilt.
- **hash**: shard ``i`` owns the keys whose splitmix64 hash is ``i`` mod ``N`` (hot, adjacent ids
  spread over every shard). Its rows are scattered over the file, so the shard first writes a
  *part file* holding only its rows (streamed in bounded chunks, once per layout, atomically
  renamed, reused by its replicas) and memory-maps that.

Either way a shard's resident table is its part only (``ShardPart.table_bytes``, and
``resident_bytes`` measures it from ``/proc/self/smaps``).
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from servefleet.common.errors import InvalidArgument, ResourceExhausted
from servefleet.direct import ctr

_PART_HEADER = struct.Struct("<8sQII")  # magic, rows, dim, reserved
_PART_MAGIC = b"SFSHARD1"
#: Rows read at a time while writing a hash part file (bounds the builder's memory).
_CHUNK_ROWS = 1 << 16
_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def mix64(keys: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fixed, well-spread hash of int64 keys (same on every node)."""
    z = keys.astype(np.uint64) + _MIX[0]
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _MIX[1]
        z = (z ^ (z >> np.uint64(27))) * _MIX[2]
    return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class Layout:
    """Which shard owns which key of a table of ``num_rows`` rows."""

    partitioning: str  # "range" | "hash"
    shards: int
    num_rows: int

    @property
    def name(self) -> str:
        return f"{self.partitioning}-{self.shards}"

    def key_range(self, shard: int) -> tuple[int, int]:
        """The keys ``[lo, hi)`` of a range shard."""
        return shard * self.num_rows // self.shards, (shard + 1) * self.num_rows // self.shards

    def owners(self, keys: np.ndarray) -> np.ndarray:
        """Owning shard of each key (keys already checked to lie in ``[0, num_rows)``)."""
        if self.partitioning == "hash":
            return (mix64(keys) % np.uint64(self.shards)).astype(np.int64)
        bounds = np.array([self.key_range(i)[1] for i in range(self.shards)], dtype=np.int64)
        return np.searchsorted(bounds, keys, side="right")

    def split(self, keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Distinct keys grouped by owner: ``(shard, positions into keys)`` for each shard hit."""
        owners = self.owners(keys)
        order = np.argsort(owners, kind="stable")
        counts = np.bincount(owners, minlength=self.shards)
        groups, start = [], 0
        for shard, count in enumerate(counts.tolist()):
            if count:
                groups.append((shard, order[start : start + count]))
            start += count
        return groups


def part_bytes(layout: Layout, shard: int, dim: int) -> int:
    """Bytes of table a shard of this layout holds (rows of linear + factors, keys for hash)."""
    if layout.partitioning == "range":
        lo, hi = layout.key_range(shard)
        return (hi - lo) * 4 * (1 + dim)
    # Expected share; the exact count is known once the part is built.
    return layout.num_rows // layout.shards * (8 + 4 * (1 + dim))


def merge_ctr(
    header: ctr.TableHeader, shape: tuple[int, int], inverse: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Scores of a [batch, fields] id batch from the rows of its distinct keys (``rows``: linear
    weight then factors per key; ``inverse``: the distinct key of each id, flattened), pooled
    exactly as the unsharded reference pools rows read from one table."""
    gathered = rows[inverse]
    batch, fields = shape
    linear = np.ascontiguousarray(gathered[:, 0]).reshape(batch, fields)
    vectors = np.ascontiguousarray(gathered[:, 1:]).reshape(batch, fields, header.dim)
    return ctr.sigmoid(ctr.pooled_logits(header.bias, linear, vectors))


class ShardPart:
    """The rows of one shard, memory-mapped and faulted in, looked up by global key."""

    def __init__(
        self, table: str, layout: Layout, shard: int, *, memory_limit: int = 0, cache_dir: str = ""
    ) -> None:
        if not 0 <= shard < layout.shards:
            raise InvalidArgument(f"shard {shard} is outside layout {layout.name}")
        self.header = ctr.read_header(table)
        if self.header.num_rows != layout.num_rows:
            raise InvalidArgument(
                f"{table}: {self.header.num_rows} rows where layout {layout.name} expects {layout.num_rows}"
            )
        self.layout, self.shard = layout, shard
        needed = part_bytes(layout, shard, self.header.dim)
        if memory_limit and needed > memory_limit:
            raise ResourceExhausted(
                f"shard {shard} of layout {layout.name} needs {needed / 2**20:.1f} MiB of table, above "
                f"its memory limit {memory_limit / 2**20:.1f} MiB (spec.resources.memory): raise "
                "spec.sharding.shards so each part fits"
            )
        dim = self.header.dim
        self.keys: np.ndarray | None = None  # hash: the sorted keys this shard owns
        if layout.partitioning == "range":
            self.path = table
            self.lo, hi = layout.key_range(shard)
            rows = hi - self.lo
            linear_at = self.header.linear_offset + 4 * self.lo
            factors_at = self.header.factors_offset + 4 * dim * self.lo
        else:
            self.path = str(build_hash_part(table, self.header, layout, shard, cache_dir=cache_dir))
            self.lo = 0
            rows = _read_part_header(self.path)
            self.keys = np.asarray(
                np.memmap(self.path, dtype="<i8", mode="r", offset=_PART_HEADER.size, shape=(rows,))
            )
            linear_at = _PART_HEADER.size + 8 * rows
            factors_at = linear_at + 4 * rows
        self.rows = rows
        # Plain ndarray views of the maps: np.memmap's own __getitem__ costs more than the gather.
        self.linear = np.asarray(np.memmap(self.path, dtype="<f4", mode="r", offset=linear_at, shape=(rows,)))
        self.factors = np.asarray(
            np.memmap(self.path, dtype="<f4", mode="r", offset=factors_at, shape=(rows, dim))
        )
        self.table_bytes = rows * 4 * (1 + dim) + (rows * 8 if self.keys is not None else 0)
        # Fault every page in now: lookups never wait on the disk, and resident == the part.
        for array in (self.keys, self.linear, self.factors):
            if array is not None and array.size:
                float(np.asarray(array).reshape(-1)[:: 1024 // array.itemsize].sum())

    def local(self, keys: np.ndarray) -> np.ndarray:
        """Row numbers in this part of global ``keys``; InvalidArgument for a key it does not own."""
        if self.keys is None:
            local = keys - self.lo
            bad = np.flatnonzero((local < 0) | (local >= self.rows))
        else:
            local = np.minimum(np.searchsorted(self.keys, keys), max(self.rows - 1, 0))
            bad = np.flatnonzero(self.keys[local] != keys) if self.rows else np.arange(len(keys))
        if bad.size:
            raise InvalidArgument(
                f"key {int(keys[bad[0]])} is not held by shard {self.shard} of layout {self.layout.name}"
            )
        return local

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Rows of ``keys``: float32 [len(keys), 1 + dim], the linear weight then the factors."""
        local = self.local(keys)
        out = np.empty((len(keys), 1 + self.header.dim), dtype=np.float32)
        out[:, 0] = self.linear[local]
        out[:, 1:] = self.factors[local]
        return out

    def resident_bytes(self) -> int:
        """Bytes of this part's own mappings that are in memory now (measured, not computed)."""
        arrays = [a for a in (self.keys, self.linear, self.factors) if a is not None and a.size]
        return mapped_rss([(a.ctypes.data, a.ctypes.data + a.nbytes) for a in arrays])


def mapped_rss(spans: list[tuple[int, int]]) -> int:
    """Sum of ``Rss`` over this process's mappings that overlap any address span (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line: start-end ...
                start, end = (int(x, 16) for x in first.split("-"))
                inside = any(lo < end and start < hi for lo, hi in spans)
            elif inside and first == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


def build_hash_part(
    table: str, header: ctr.TableHeader, layout: Layout, shard: int, *, cache_dir: str = ""
) -> Path:
    """The part file of a hash shard, written once (streamed, bounded memory, atomic rename) and
    named by the table's identity, so replicas share it and a changed table gets a new one."""
    stat = os.stat(table)
    identity = hashlib.sha1(f"{os.path.realpath(table)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    folder = Path(cache_dir) if cache_dir else Path(table).parent
    path = folder / f"{Path(table).name}.{identity.hexdigest()[:10]}.{layout.name}.{shard}.part"
    if path.exists():
        return path
    rows, dim = header.num_rows, header.dim
    linear = np.memmap(table, dtype="<f4", mode="r", offset=header.linear_offset, shape=(rows,))
    factors = np.memmap(table, dtype="<f4", mode="r", offset=header.factors_offset, shape=(rows, dim))
    chunks = [(lo, min(lo + _CHUNK_ROWS, rows)) for lo in range(0, rows, _CHUNK_ROWS)]

    def owned(lo: int, hi: int) -> np.ndarray:
        keys = np.arange(lo, hi, dtype=np.int64)
        return keys[layout.owners(keys) == shard]

    count = sum(len(owned(lo, hi)) for lo, hi in chunks)
    scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with scratch.open("wb") as out:
        out.write(_PART_HEADER.pack(_PART_MAGIC, count, dim, 0))
        for lo, hi in chunks:
            out.write(owned(lo, hi).astype("<i8").tobytes())
        for lo, hi in chunks:
            out.write(np.asarray(linear[owned(lo, hi)], dtype="<f4").tobytes())
        for lo, hi in chunks:
            out.write(np.asarray(factors[owned(lo, hi)], dtype="<f4").tobytes())
    os.replace(scratch, path)
    return path


def _read_part_header(path: str) -> int:
    with open(path, "rb") as f:
        magic, rows, _, _ = _PART_HEADER.unpack(f.read(_PART_HEADER.size))
    if magic != _PART_MAGIC:
        raise InvalidArgument(f"{path}: not a servefleet shard part file")
    return int(rows)
