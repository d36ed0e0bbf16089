"""Click-through-rate model for the direct ingress: a factorization machine over sparse feature ids.

Each example carries one feature id per field; ids index shared embedding tables (a linear weight
and a factor vector per row). Field ``f`` owns the id range ``[f * rows_per_field, (f + 1) *
rows_per_field)``. ``train`` fits the model with mini-batch SGD on click logs (``synthetic_clicks``
makes them from a hidden teacher model, so nothing is downloaded); ``export_model`` writes the file
``cpp/ctr_model.cc`` loads; ``FactorizationMachine.score`` is the numpy reference the C++ scores
must match.
"""

from __future__ import annotations

import argparse
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from servefleet.common.errors import InvalidArgument
from servefleet.direct._direct import INPUT_NAME, OUTPUT_NAME

#: File layout shared with cpp/ctr_model.h: magic, num_fields, dim, num_rows, bias, reserved.
_HEADER = struct.Struct("<8sIIQfI")
_MAGIC = b"SFCTRFM1"


@dataclass(frozen=True)
class FactorizationMachine:
    """logit = bias + sum_i linear[id_i] + sum_{i<j} <factors[id_i], factors[id_j]>; score = sigmoid."""

    num_fields: int
    bias: float
    linear: np.ndarray  # (num_rows,) float32
    factors: np.ndarray  # (num_rows, dim) float32

    @property
    def num_rows(self) -> int:
        return int(self.linear.shape[0])

    @property
    def dim(self) -> int:
        return int(self.factors.shape[1])

    def check(self, ids: np.ndarray) -> np.ndarray:
        """ids as int64 [batch, num_fields]; InvalidArgument naming what is wrong otherwise."""
        return check_ids(ids, num_fields=self.num_fields, num_rows=self.num_rows)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Unchecked float32 logits, in the same summation order as the C++ model."""
        return pooled_logits(self.bias, self.linear[ids], self.factors[ids])

    def score(self, ids: np.ndarray) -> np.ndarray:
        """Click probabilities, float32 [batch]: the reference the C++ direct ingress must match."""
        return sigmoid(self.logits(self.check(ids)))


def check_ids(ids: np.ndarray, *, num_fields: int, num_rows: int) -> np.ndarray:
    """ids as int64 [batch, num_fields] within [0, num_rows); InvalidArgument naming the first
    wrong one otherwise (shared by the reference and the sharded router, so both say the same)."""
    ids = np.asarray(ids)
    if ids.dtype != np.int64:
        raise InvalidArgument(f"feature ids must be INT64, got {ids.dtype}")
    if ids.ndim != 2 or ids.shape[1] != num_fields:
        raise InvalidArgument(f"feature ids must have shape [batch, {num_fields}], got {list(ids.shape)}")
    bad = np.flatnonzero((ids < 0) | (ids >= num_rows))
    if bad.size:
        example, field = divmod(int(bad[0]), num_fields)
        raise InvalidArgument(
            f"feature id {int(ids.reshape(-1)[bad[0]])} at example {example}, field {field} "
            f"is outside [0, {num_rows})"
        )
    return ids


def pooled_logits(bias: float, linear: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """FM logits from looked-up rows: ``linear`` [batch, fields], ``vectors`` [batch, fields, dim],
    both C-contiguous float32. One function for the reference and the sharded router's merge, so
    rows gathered from shards score bit for bit like rows read from one table."""
    sums = vectors.sum(axis=1)
    pairs = 0.5 * ((sums * sums).sum(axis=1) - (vectors * vectors).sum(axis=(1, 2)))
    return np.float32(bias) + linear.sum(axis=1) + pairs


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def random_model(
    *, num_rows: int, num_fields: int, dim: int, scale: float, seed: int
) -> FactorizationMachine:
    rng = np.random.default_rng(seed)
    return FactorizationMachine(
        num_fields=num_fields,
        bias=-1.0,
        linear=(rng.standard_normal(num_rows, dtype=np.float32) * scale),
        factors=(rng.standard_normal((num_rows, dim), dtype=np.float32) * scale),
    )


def synthetic_clicks(
    teacher: FactorizationMachine, *, examples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Click log drawn from a teacher model: Zipf-popular ids per field, clicks ~ Bernoulli(score)."""
    rng = np.random.default_rng(seed)
    per_field = teacher.num_rows // teacher.num_fields
    ranks = np.minimum(rng.zipf(1.3, size=(examples, teacher.num_fields)) - 1, per_field - 1)
    ids = (ranks + np.arange(teacher.num_fields) * per_field).astype(np.int64)
    clicks = (rng.random(examples) < teacher.score(ids)).astype(np.float32)
    return ids, clicks


def log_loss(model: FactorizationMachine, ids: np.ndarray, clicks: np.ndarray) -> float:
    p = np.clip(model.score(ids).astype(np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(clicks * np.log(p) + (1 - clicks) * np.log(1 - p)))


def train(
    ids: np.ndarray,
    clicks: np.ndarray,
    *,
    num_rows: int,
    dim: int,
    epochs: int = 2,
    batch_size: int = 512,
    learning_rate: float = 0.05,
    seed: int = 0,
) -> FactorizationMachine:
    """Mini-batch SGD on log loss; rows never seen keep their small random initialisation."""
    rng = np.random.default_rng(seed)
    fields = ids.shape[1]
    model = random_model(num_rows=num_rows, num_fields=fields, dim=dim, scale=0.01, seed=seed)
    linear, factors = model.linear, model.factors
    bias = float(np.log(clicks.mean() / (1 - clicks.mean()))) if 0 < clicks.mean() < 1 else 0.0
    for _ in range(epochs):
        order = rng.permutation(len(ids))
        for start in range(0, len(ids), batch_size):
            batch = order[start : start + batch_size]
            rows, y = ids[batch], clicks[batch]
            current = FactorizationMachine(fields, bias, linear, factors)
            grad = (1.0 / (1.0 + np.exp(-current.logits(rows))) - y).astype(np.float32)
            vectors = factors[rows]
            # d logit / d factors[id_i] = sum_j factors[id_j] - factors[id_i]
            factor_grad = grad[:, None, None] * (vectors.sum(axis=1, keepdims=True) - vectors)
            step = learning_rate / len(batch)
            bias -= step * float(grad.sum())
            np.add.at(linear, rows.reshape(-1), -step * np.repeat(grad, fields))
            np.add.at(factors, rows.reshape(-1), -step * factor_grad.reshape(-1, dim))
    return FactorizationMachine(fields, bias, linear, factors)


def build_model(
    *, num_rows: int = 1 << 20, num_fields: int = 16, dim: int = 16, examples: int = 50_000, seed: int = 0
) -> FactorizationMachine:
    """A trained CTR model of production-like shape (default 1M embedding rows), built offline."""
    teacher = random_model(num_rows=num_rows, num_fields=num_fields, dim=dim, scale=0.3, seed=seed + 1)
    ids, clicks = synthetic_clicks(teacher, examples=examples, seed=seed + 2)
    return train(ids, clicks, num_rows=num_rows, dim=dim, seed=seed)


def export_model(model: FactorizationMachine, path: str | Path) -> Path:
    """Writes the file the C++ direct ingress loads (layout in cpp/ctr_model.h)."""
    path = Path(path)
    with path.open("wb") as out:
        out.write(_HEADER.pack(_MAGIC, model.num_fields, model.dim, model.num_rows, model.bias, 0))
        out.write(np.ascontiguousarray(model.linear, dtype="<f4").tobytes())
        out.write(np.ascontiguousarray(model.factors, dtype="<f4").tobytes())
    return path


@dataclass(frozen=True)
class TableHeader:
    """The header of an exported model: what a router needs without mapping any table."""

    num_fields: int
    dim: int
    num_rows: int
    bias: float

    @property
    def linear_offset(self) -> int:
        return _HEADER.size

    @property
    def factors_offset(self) -> int:
        return _HEADER.size + 4 * self.num_rows


def read_header(path: str | Path) -> TableHeader:
    """The checked header of a model file (InvalidArgument when it is not one)."""
    try:
        with Path(path).open("rb") as f:
            head = f.read(_HEADER.size)
            size = f.seek(0, 2)
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read the model file: {exc.strerror or exc}") from None
    if len(head) < _HEADER.size:
        raise InvalidArgument(f"{path}: too short for a servefleet CTR model")
    magic, fields, dim, rows, bias, _ = _HEADER.unpack(head)
    if magic != _MAGIC:
        raise InvalidArgument(f"{path}: not a servefleet CTR model")
    if size != _HEADER.size + 4 * rows * (1 + dim):
        raise InvalidArgument(f"{path}: {size} bytes, header says {_HEADER.size + 4 * rows * (1 + dim)}")
    return TableHeader(fields, dim, rows, bias)


def load_model(path: str | Path) -> FactorizationMachine:
    """Reads an exported model back (memory-mapped), for the Python reference and peers."""
    header = read_header(path)
    rows, dim = header.num_rows, header.dim
    tables = np.memmap(path, dtype="<f4", mode="r", offset=header.linear_offset, shape=(rows * (1 + dim),))
    return FactorizationMachine(
        header.num_fields, header.bias, tables[:rows], tables[rows:].reshape(rows, dim)
    )


class CtrScorer:
    """The numpy reference as a servefleet model class (``kind: python``, ``init_args.model_path``):
    the same model behind the Python data plane, the peer the direct ingress is measured against."""

    def __init__(self, model_path: str) -> None:
        self.model = load_model(model_path)

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if set(inputs) != {INPUT_NAME}:
            raise InvalidArgument(f"expected exactly one input tensor {INPUT_NAME!r}, got {sorted(inputs)}")
        return {OUTPUT_NAME: self.model.score(inputs[INPUT_NAME])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the CTR model on synthetic clicks and export it.")
    parser.add_argument("out", help="model file to write")
    parser.add_argument("--rows", type=int, default=1 << 20)
    parser.add_argument("--fields", type=int, default=16)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--examples", type=int, default=50_000)
    args = parser.parse_args(argv)
    model = build_model(num_rows=args.rows, num_fields=args.fields, dim=args.dim, examples=args.examples)
    print(export_model(model, args.out))


if __name__ == "__main__":
    main()
