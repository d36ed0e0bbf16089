"""Triton's own Prometheus metrics (``nv_inference_*``), as the platform reads and re-exports them.

The actor scrapes its tritonserver's ``/metrics`` (loopback) and keeps the ``nv_inference_*``
families. ``TritonCollector`` hands them to a ``prometheus_client`` registry, so whatever serves the
actor's own ``/metrics`` re-exports them with ``app``/``replica`` labels added (counters in
prometheus_client's form: ``nv_inference_request_success_total``). The server's own page, names as
Triton writes them, is linked from discovery (label ``metrics`` of the endpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

PREFIX = "nv_inference_"


def inference_families(text: str) -> list[Metric]:
    """The ``nv_inference_*`` families of a Prometheus text page."""
    return [f for f in text_string_to_metric_families(text) if f.name.startswith(PREFIX)]


@dataclass(frozen=True)
class Totals:
    """Counts summed over every model and version of one server."""

    success: float = 0.0
    failure: float = 0.0
    pending: float = 0.0

    @property
    def finished(self) -> float:
        return self.success + self.failure


def totals(families: list[Metric]) -> Totals:
    sums = {"success": 0.0, "failure": 0.0, "pending": 0.0}
    names = {
        "nv_inference_request_success": "success",
        "nv_inference_request_failure": "failure",
        "nv_inference_pending_request_count": "pending",
    }
    for family in families:
        for sample in family.samples:
            key = names.get(sample.name.removesuffix("_total"))
            if key:
                sums[key] += sample.value
    return Totals(**sums)


class TritonCollector(Collector):
    """Re-exports a tritonserver's ``nv_inference_*`` families, scraped when collected;
    ``scrape`` returns the server's Prometheus text (blocking, short timeout) or raises."""

    def __init__(self, scrape: Callable[[], str], labels: dict[str, str]) -> None:
        self.scrape = scrape
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        try:
            families = inference_families(self.scrape())
        except OSError:  # the server is restarting: nothing to report this time
            return
        for family in families:
            out = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                out.add_sample(sample.name, {**sample.labels, **self.labels}, sample.value)
            yield out
