"""Prometheus metrics of the local function hosts (what `skyfuse up --metrics-port` serves).

In a real cloud the trigger is the cloud's own and so are its metrics (Lambda's event source
mapping, Eventarc, the Functions host); locally the hosts play those triggers, so they say what
they did: deliveries by result, retries, dead letters, handler (invocation) latency, and, read at
scrape time, each group's lag.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from skyfuse.runtime.host import FunctionHost

log = logging.getLogger("skyfuse.metrics")
LABELS = ("cloud", "function")


class HostMetrics:
    """One set per process: every host reports into it."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.deliveries = Counter("skyfuse_deliveries", "Records a function host finished or retried, by result "
                                  "(ok, rejected by the function, retry, dead-lettered by the host).",
                                  [*LABELS, "result"], registry=self.registry)
        self.dead_letters = Counter("skyfuse_dead_letters", "Records written to the function's dead-letter topic.",
                                    LABELS, registry=self.registry)
        self.retries = Counter("skyfuse_retries", "Failed deliveries that will be tried again.", LABELS,
                               registry=self.registry)
        self.invocation = Histogram("skyfuse_invocation_seconds", "Time of one invocation of a function's entry "
                                    "point (a batch of records).", LABELS, registry=self.registry,
                                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.hosts: list[FunctionHost] = []
        self._lock = threading.Lock()
        self.registry.register(_Lag(self))

    def delivered(self, cloud: str, function: str, result: str) -> None:
        self.deliveries.labels(cloud, function, result).inc()
        if result == "retry":
            self.retries.labels(cloud, function).inc()
        elif result in ("dead-lettered", "rejected"):  # by the host, or by the function itself
            self.dead_letters.labels(cloud, function).inc()

    def watch(self, hosts: list[FunctionHost]) -> None:
        """Report the lag of these hosts' groups at each scrape."""
        with self._lock:
            self.hosts.extend(hosts)

    def serve(self, port: int, addr: str = "127.0.0.1") -> tuple[WSGIServer, threading.Thread]:
        """Serve /metrics on addr:port; returns (server, thread)."""
        return start_http_server(port, addr=addr, registry=self.registry)


class _Lag:
    """The lag gauge, read from the bus when scraped, not kept up to date by the hosts."""

    def __init__(self, metrics: HostMetrics):
        self.metrics = metrics

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily("skyfuse_consumer_lag", "Records not yet committed by a function's consumer group.",
                                  labels=[*LABELS, "topic"])]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("skyfuse_consumer_lag", "Records not yet committed by a function's consumer group.",
                                  labels=[*LABELS, "topic"])
        with self.metrics._lock:
            hosts = list(self.metrics.hosts)
        for host in hosts:
            for topic in host.topics:
                try:
                    gauge.add_metric([host.cloud, host.function, topic], host.bus.lag(host.group, topic))
                except Exception as exc:  # a scrape must not fail because the bus hiccuped
                    log.warning("lag of %s on %s unknown: %s", host.group, topic, exc)
        yield gauge
