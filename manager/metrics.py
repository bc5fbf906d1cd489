"""Prometheus metrics of the manager (``--metrics-port``), served on 127.0.0.1 only.

prometheus-client is used rather than our own exposition code: it owns the text
format, histogram buckets and the HTTP endpoint that scrapers expect.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """All of the manager's metrics, in a registry of their own."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.grants = Counter("menos_grants", "memory tokens granted", ["kind"], registry=r)
        self.releases = Counter("menos_releases", "memory tokens released", registry=r)
        self.reclaims = Counter("menos_reclaims", "kept activations reclaimed (adaptive policy)", registry=r)
        self.worker_deaths = Counter("menos_worker_deaths", "workers that died unexpectedly", registry=r)
        self.oom_retries = Counter("menos_oom_retries", "computes retried after running out of memory", registry=r)
        self.queue_seconds = Histogram("menos_queue_seconds", "wait for a memory grant", buckets=_TIME_BUCKETS,
                                       registry=r)  # fmt: skip
        self.compute_seconds = Histogram("menos_compute_seconds", "time a grant was held", buckets=_TIME_BUCKETS,
                                         registry=r)  # fmt: skip
        self.capacity = Gauge("menos_memory_capacity_bytes", "bytes the scheduler may grant", registry=r)
        self.granted = Gauge("menos_memory_granted_bytes", "bytes granted now", registry=r)
        self.shared = Gauge("menos_memory_shared_bytes", "bytes of the shared base weights", registry=r)
        self.queued = Gauge("menos_queue_length", "requests waiting for memory", registry=r)
        self.clients = Gauge("menos_clients_connected", "client sessions", registry=r)
        self.live_workers = Gauge("menos_workers_live", "worker processes (parked sessions have none)", registry=r)
        self.parks = Counter("menos_parks", "idle sessions parked: state saved, worker exited", registry=r)
        self.wakes = Counter("menos_wakes", "parked sessions woken by a request", registry=r)
        self.wake_seconds = Histogram("menos_wake_seconds", "a request's wait for its parked session's new worker "
                                      "(a slot, then the start)", buckets=_TIME_BUCKETS, registry=r)  # fmt: skip

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        from manager.preflight import StartupError

        try:
            start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:  # taken since the check before the imports (manager.preflight)
            raise StartupError(f"--metrics-port {port}: {exc.strerror} on {addr}; pick another port (0: no metrics)") from None
