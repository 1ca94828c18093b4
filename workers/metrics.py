"""Prometheus metrics of a worker: the adapter cache tiers of its engine (hits, fetches, evictions, sizes).

Served on ``KRONA_WORKER_METRICS_PORT`` when it is set (each worker process its own port).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["EngineCollector", "start_metrics_server"]

_COUNTERS = {
    "device_hits": "requests served by an adapter already in a device slot",
    "host_hits": "adapters loaded into a slot from host memory",
    "storage_fetches": "adapters fetched from storage (misses of both tiers)",
    "device_evictions": "adapters evicted from a device slot",
    "host_evictions": "adapters evicted from host memory",
}


class EngineCollector(Collector):
    """Reads ``Engine.stats()`` at scrape time; nothing to keep in sync."""

    def __init__(self, engines: Callable[[], list]) -> None:
        self.engines = engines

    def collect(self) -> Iterator:
        engines = self.engines()
        for name, help_text in _COUNTERS.items():
            family = CounterMetricFamily(f"krona_adapter_cache_{name}", help_text)
            family.add_metric([], sum(e.stats()[name] for e in engines))
            yield family
        resident = GaugeMetricFamily("krona_adapter_cache_device_resident", "adapters in device slots")
        resident.add_metric([], sum(e.stats()["device_resident"] for e in engines))
        yield resident
        host = GaugeMetricFamily("krona_adapter_cache_host_bytes", "bytes of adapters in host memory")
        host.add_metric([], sum(e.stats()["host_bytes"] for e in engines))
        yield host


def start_metrics_server(port: int) -> None:
    # lazy: loads torch, sqlalchemy, numpy, …
    from .inference.engine import Engine
    from .runtime import runtime

    REGISTRY.register(EngineCollector(lambda: [e for e in runtime().pipelines.values() if isinstance(e, Engine)]))
    start_http_server(port, addr="0.0.0.0")
