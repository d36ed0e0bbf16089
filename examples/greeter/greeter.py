"""A model shipped with its own ``working_dir`` and configured through ``runtime_env.env_vars``:
it answers each name in ``name`` (BYTES [-1]) with ``$GREETING, <name>`` in ``greeting``."""

from __future__ import annotations

import os

import numpy as np


class Greeter:
    def __init__(self, punctuation: str = "!") -> None:
        self.greeting = os.environ.get("GREETING", "hello")
        self.punctuation = punctuation

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in inputs["name"].reshape(-1)]
        out = np.array([f"{self.greeting}, {n}{self.punctuation}".encode() for n in names], dtype=np.object_)
        return {"greeting": out}
