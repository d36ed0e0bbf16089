"""A tiny numpy iris classifier: weights are built by the code (no file to download).

Takes ``features`` FP32 [batch, 4] (sepal length/width, petal length/width in cm) and returns
``label`` INT64 [batch] (0 setosa, 1 versicolor, 2 virginica) and ``scores`` FP32 [batch, 3].
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

# Class centroids of the classic iris data set (cm); the classifier scores by distance to them.
CENTROIDS = np.array(
    [[5.006, 3.428, 1.462, 0.246], [5.936, 2.770, 4.260, 1.326], [6.588, 2.974, 5.552, 2.026]],
    dtype=np.float32,
)


class IrisClassifier:
    """Nearest-centroid classifier written as a linear layer: scores = x @ W + b."""

    def __init__(self, temperature: float = 1.0) -> None:
        self.weights = (2 * CENTROIDS.T).astype(np.float32)  # [4, 3]
        self.bias = -np.sum(CENTROIDS**2, axis=1).astype(np.float32)  # [3]
        self.temperature = float(temperature)

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.asarray(inputs["features"], dtype=np.float32)
        logits = (x @ self.weights + self.bias) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        scores = np.exp(logits)
        scores /= scores.sum(axis=1, keepdims=True)
        return {"label": scores.argmax(axis=1).astype(np.int64), "scores": scores.astype(np.float32)}


class StreamingIrisClassifier(IrisClassifier):
    """The same classifier over ModelStreamInfer as well: one response per row, ``row_delay_ms``
    apart, so a stream lasts long enough to be cut mid-way (the chaos suite's streaming load)."""

    def __init__(self, temperature: float = 1.0, row_delay_ms: float = 10.0) -> None:
        super().__init__(temperature)
        self.row_delay_s = row_delay_ms / 1000

    async def stream(self, inputs: dict[str, np.ndarray]) -> AsyncIterator[dict[str, np.ndarray]]:
        for row in np.asarray(inputs["features"], dtype=np.float32):
            await asyncio.sleep(self.row_delay_s)
            yield self({"features": row[None, :]})
