"""Triton fixtures: the example repository, broken and versioned copies of it, and the data
plane's discovery and Ray driver (shared, not copied)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import InferInput

from servefleet.services.triton import install
from tests.integration.dataplane.conftest import discovery_server, ray_driver
from tests.integration.keeper.conftest import procs

__all__ = ["discovery_server", "procs", "ray_driver"]

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "triton"
MODEL = "add_sub"


@pytest.fixture(scope="session")
def triton_install() -> install.TritonInstall:
    return install.find()


def versioned_repository(root: Path, version: int, *, scale: float = 1.0) -> Path:
    """A copy of the example repository whose model is served at ``version`` and multiplies its
    OUTPUT0 by ``scale`` (so a test can tell versions apart by their answers)."""
    repository = root / f"models-v{version}"
    shutil.copytree(EXAMPLE / "models", repository)
    model = repository / MODEL
    (model / "1").rename(model / str(version))
    code = (model / str(version) / "model.py").read_text()
    (model / str(version) / "model.py").write_text(code.replace("(a + b)", f"((a + b) * {scale})"))
    return repository


def broken_repository(root: Path) -> Path:
    """A repository whose config Triton refuses (an unknown data type)."""
    repository = root / "broken"
    shutil.copytree(EXAMPLE / "models", repository)
    config = repository / MODEL / "config.pbtxt"
    config.write_text(config.read_text().replace("TYPE_FP32", "TYPE_FP33", 1))
    return repository


def add_sub_inputs(a: np.ndarray, b: np.ndarray) -> list[InferInput]:
    tensors = []
    for name, value in (("INPUT0", a), ("INPUT1", b)):
        tensor = InferInput(name, list(value.shape), "FP32")
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def pid_alive(pid: int) -> bool:
    """A process exists and is not a zombie (checked by pid, not by name)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
