"""Approximate nearest neighbours by cosine, one hnswlib index per partition (tenant, model
version), so a lookup can only ever return an entry of its own partition."""

from __future__ import annotations

import threading

import hnswlib
import numpy as np

from servefleet.semantic_cache.embedder import DIM

Partition = tuple[str, str]  # (tenant, model version)


class VectorIndex:
    """Labels are the entries' ids in Redis. Thread-safe: lookups run in executor threads while
    the sync loop adds and removes on the event loop."""

    def __init__(self, *, dim: int = DIM, initial_capacity: int = 1024, ef: int = 64) -> None:
        self.dim = dim
        self._initial = initial_capacity
        self._ef = ef
        self._parts: dict[Partition, hnswlib.Index] = {}
        self._labels: dict[Partition, set[int]] = {}
        self._where: dict[int, Partition] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sum(len(labels) for labels in self._labels.values())

    def add(self, partition: Partition, label: int, vector: np.ndarray) -> None:
        with self._lock:
            index = self._parts.get(partition)
            if index is None:
                index = self._parts[partition] = hnswlib.Index(space="ip", dim=self.dim)
                index.init_index(
                    max_elements=self._initial, ef_construction=100, M=16, allow_replace_deleted=True
                )
                index.set_ef(self._ef)
                self._labels[partition] = set()
            labels = self._labels[partition]
            if label in labels:
                return
            if index.get_current_count() >= index.get_max_elements():
                index.resize_index(2 * index.get_max_elements())
            index.add_items(vector.reshape(1, -1), [label], replace_deleted=True)
            labels.add(label)
            self._where[label] = partition

    def remove(self, label: int) -> None:
        with self._lock:
            partition = self._where.pop(label, None)
            if partition is not None:
                self._parts[partition].mark_deleted(label)
                self._labels[partition].discard(label)

    def search(self, partition: Partition, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Up to ``k`` (label, cosine similarity) pairs, most similar first (vectors are unit)."""
        with self._lock:
            index = self._parts.get(partition)
            count = len(self._labels.get(partition, ()))
            if index is None or count == 0:
                return []
            found, distances = index.knn_query(vector.reshape(1, -1), k=min(k, count))
        return [(int(label), 1.0 - float(d)) for label, d in zip(found[0], distances[0], strict=True)]
