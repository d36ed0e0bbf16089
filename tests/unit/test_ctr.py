"""The CTR model's Python side: training learns, export/load round-trips, bad ids are named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from servefleet.common.errors import InvalidArgument
from servefleet.direct import ctr

ROWS, FIELDS, DIM = 4096, 4, 8


@pytest.fixture(scope="module")
def clicks() -> tuple[ctr.FactorizationMachine, np.ndarray, np.ndarray]:
    teacher = ctr.random_model(num_rows=ROWS, num_fields=FIELDS, dim=DIM, scale=0.5, seed=1)
    ids, clicks = ctr.synthetic_clicks(teacher, examples=30_000, seed=2)
    return teacher, ids, clicks


def test_training_lowers_held_out_log_loss(
    clicks: tuple[ctr.FactorizationMachine, np.ndarray, np.ndarray],
) -> None:
    _, ids, labels = clicks
    model = ctr.train(ids[:25_000], labels[:25_000], num_rows=ROWS, dim=DIM, epochs=3)
    untrained = ctr.random_model(num_rows=ROWS, num_fields=FIELDS, dim=DIM, scale=0.01, seed=0)
    held_out = ids[25_000:], labels[25_000:]
    assert ctr.log_loss(model, *held_out) < ctr.log_loss(untrained, *held_out) - 0.02


def test_score_is_the_factorization_machine_formula() -> None:
    model = ctr.random_model(num_rows=16, num_fields=3, dim=2, scale=1.0, seed=3)
    ids = np.array([[0, 5, 9]], dtype=np.int64)
    v = model.factors[ids[0]].astype(np.float64)
    pairs = v[0] @ v[1] + v[0] @ v[2] + v[1] @ v[2]
    logit = model.bias + model.linear[ids[0]].astype(np.float64).sum() + pairs
    np.testing.assert_allclose(model.score(ids), [1 / (1 + np.exp(-logit))], rtol=1e-5)


def test_export_and_load_round_trip(tmp_path: Path) -> None:
    model = ctr.random_model(num_rows=ROWS, num_fields=FIELDS, dim=DIM, scale=0.2, seed=4)
    loaded = ctr.load_model(ctr.export_model(model, tmp_path / "m.bin"))
    assert (loaded.num_rows, loaded.num_fields, loaded.dim) == (ROWS, FIELDS, DIM)
    ids = np.arange(2 * FIELDS, dtype=np.int64).reshape(2, FIELDS)
    np.testing.assert_array_equal(loaded.score(ids), model.score(ids))


def test_load_rejects_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(b"x" * 100)
    with pytest.raises(InvalidArgument, match="not a servefleet CTR model"):
        ctr.load_model(path)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (np.zeros((2, FIELDS), dtype=np.int32), "must be INT64"),
        (np.zeros((2, FIELDS + 1), dtype=np.int64), r"shape \[batch, 4\]"),
        (np.array([[0, 1, 2, ROWS]], dtype=np.int64), "feature id 4096 at example 0, field 3"),
        (np.array([[0, -1, 2, 3]], dtype=np.int64), "feature id -1 at example 0, field 1"),
    ],
)
def test_bad_ids_are_named(ids: np.ndarray, message: str) -> None:
    model = ctr.random_model(num_rows=ROWS, num_fields=FIELDS, dim=DIM, scale=0.2, seed=5)
    with pytest.raises(InvalidArgument, match=message):
        model.score(ids)
