"""Prometheus metrics of an inference host, served at GET /metrics (open, like /health).

    skyfuse_inference_requests_total{route, status}           requests answered, by route template
    skyfuse_inference_request_duration_seconds{route}         latency histogram (50 µs to 10 s)
    skyfuse_inference_requests_in_flight                      requests being answered now
    skyfuse_inference_model_info{version}                     1 for the version served, 0 for earlier ones
    skyfuse_inference_model_load_failures_total               models the pointer named that failed to load
    skyfuse_inference_bytes_total{direction}                  HTTP body bytes received and sent (scrapes not counted)

`route` is a template ("/predict", "/v2/models/{name}/infer", ..., "unmatched" for any other
path), so a scanner cannot grow the number of series.

One process (uvicorn) keeps its metrics as plain numbers, taking one lock once per request as it
ends (prometheus_client's metrics take a lock per update: seven a request), and imports
prometheus_client only to write them out for the first scrape (not on the way to its first
answer). Several worker processes (gunicorn, `WORKERS`) share them through files in
`PROMETHEUS_MULTIPROC_DIR` (prometheus_client's multiprocess mode, each update written at once):
the parent calls `prepare_workers` before it forks, and any worker's /metrics then adds up all of
them. prometheus_client picks its mode when it is first imported, so it is never imported at
module import here.
"""
from __future__ import annotations

import atexit
import bisect
import glob
import itertools
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, MutableMapping
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # prometheus_client is imported when needed (see above)
    from prometheus_client import Counter, Histogram
    from prometheus_client.metrics_core import Metric

    from skyfuse.serving.model import LoadedModel

log = logging.getLogger("skyfuse.serving.prometheus")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The core answers in tens of µs; a 5 ms first bucket (the default's) would hide everything.
BUCKETS = (5e-05, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
REQUESTS, REQUESTS_HELP = "skyfuse_inference_requests", "Requests answered, by route template and HTTP status."
LATENCY, LATENCY_HELP = "skyfuse_inference_request_duration_seconds", "Time to answer a request, by route template."
IN_FLIGHT, IN_FLIGHT_HELP = "skyfuse_inference_requests_in_flight", "Requests being answered now."
MODEL, MODEL_HELP = "skyfuse_inference_model_info", "1 for the model version served (0: served before)."
FAILURES, FAILURES_HELP = ("skyfuse_inference_model_load_failures", "Models the serving pointer named that failed "
                           "to load (each attempt).")
BYTES, BYTES_HELP = "skyfuse_inference_bytes", ("HTTP body bytes, by direction (received, sent); GET /metrics "
                                                "itself is not counted.")
_LIVE_FILE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")


def prepare_workers(workers: int, environ: MutableMapping[str, str] = os.environ) -> str | None:
    """In a server's parent process, before it forks `workers` workers: point them at one metrics
    directory, emptied of an earlier run's files (PROMETHEUS_MULTIPROC_DIR if set, else a fresh one
    removed when this process exits). Returns the directory, or None when one process needs none."""
    path = environ.get(MULTIPROC_ENV)
    if workers <= 1 and not path:
        return None
    if "prometheus_client" in sys.modules and not path:
        raise RuntimeError("prometheus_client was imported before prepare_workers: it would stay in "
                           "single-process mode; call prepare_workers first thing in the server's parent")
    if path:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):  # counters of an earlier run would add up
            os.remove(stale)
    else:
        path = tempfile.mkdtemp(prefix="skyfuse-prometheus-")
        atexit.register(_remove, path, os.getpid())
        environ[MULTIPROC_ENV] = path
    return path


def _remove(path: str, pid: int) -> None:
    if os.getpid() == pid:  # forked workers inherit this handler: only the parent removes the directory
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Tracker:
    """One request being answered; the host sets `status` before it ends (500 if it raised).

    An ASGI host calls `finish()` just before the last body chunk leaves, so a client that has its
    answer and then reads /metrics always finds its request counted; `__exit__` finishes otherwise."""

    __slots__ = ("series", "route", "status", "started", "received", "sent", "finished")

    def __init__(self, series: _Series, route: str):
        self.series, self.route = series, route
        self.status: int | None = None
        self.received = self.sent = 0  # body bytes, noted by the host (the monitor's network figure)
        self.finished = False

    def __enter__(self) -> Tracker:
        self.series.began(self)
        self.started = time.perf_counter()
        return self

    def finish(self, failed: bool = False) -> None:
        if self.finished:
            return
        self.finished = True
        elapsed = time.perf_counter() - self.started
        self.series.ended(self, 500 if failed or self.status is None else self.status, elapsed)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.finish(failed=kind is not None)


class _Series:
    """Where the metrics go: a request's as it begins and ends, the model's as it changes."""

    def began(self, tracker: Tracker) -> None:
        raise NotImplementedError

    def ended(self, tracker: Tracker, status: int, seconds: float) -> None:
        raise NotImplementedError

    def swapped(self, new: str, old: str | None) -> None:
        raise NotImplementedError

    def load_failed(self) -> None:
        raise NotImplementedError

    def exposition(self) -> tuple[bytes, str]:
        raise NotImplementedError


class _InMemory(_Series):
    """One process's metrics as plain numbers, written out by a scrape (`collect`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: set[Tracker] = set()  # the requests in flight (set.add is atomic: no lock as one begins)
        self._requests: dict[tuple[str, int], int] = {}
        self._latency: dict[str, list[float]] = {}  # route → a count per bucket (+Inf last), then the sum
        self._bytes = [0, 0]  # received, sent
        self._models: dict[str, int] = {}  # version → 1 served, 0 served before
        self._failures = 0

    def began(self, tracker: Tracker) -> None:
        self._live.add(tracker)

    def ended(self, tracker: Tracker, status: int, seconds: float) -> None:
        route, key = tracker.route, (tracker.route, status)
        with self._lock:
            self._live.discard(tracker)
            self._requests[key] = self._requests.get(key, 0) + 1
            row = self._latency.get(route)
            if row is None:
                row = self._latency[route] = [0] * (len(BUCKETS) + 1) + [0.0]
            row[bisect.bisect_left(BUCKETS, seconds)] += 1  # the first bucket whose bound is >= seconds
            row[-1] += seconds
            if route != "/metrics":  # a scrape is not the service's traffic
                self._bytes[0] += tracker.received
                self._bytes[1] += tracker.sent

    def swapped(self, new: str, old: str | None) -> None:
        with self._lock:
            if old is not None and old != new:
                self._models[old] = 0
            self._models[new] = 1

    def load_failed(self) -> None:
        with self._lock:
            self._failures += 1

    def collect(self) -> Iterator[Metric]:
        """The metric families of a scrape (what prometheus_client's `generate_latest` writes out)."""
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        with self._lock:
            requests, in_flight, (received, sent) = dict(self._requests), len(self._live), self._bytes
            latency = {route: list(row) for route, row in self._latency.items()}
            models, failures = dict(self._models), self._failures
        counted = CounterMetricFamily(REQUESTS, REQUESTS_HELP, labels=["route", "status"])
        for (route, status), n in requests.items():
            counted.add_metric([route, str(status)], n)
        timed = HistogramMetricFamily(LATENCY, LATENCY_HELP, labels=["route"])
        bounds = [*map(floatToGoString, BUCKETS), "+Inf"]
        for route, row in latency.items():
            timed.add_metric([route], list(zip(bounds, itertools.accumulate(row[:-1]), strict=True)), row[-1])
        transferred = CounterMetricFamily(BYTES, BYTES_HELP, labels=["direction"])
        transferred.add_metric(["received"], received)
        transferred.add_metric(["sent"], sent)
        model = GaugeMetricFamily(MODEL, MODEL_HELP, labels=["version"])
        for version, served in models.items():
            model.add_metric([version], served)
        yield from (counted, timed, GaugeMetricFamily(IN_FLIGHT, IN_FLIGHT_HELP, in_flight), model,
                    CounterMetricFamily(FAILURES, FAILURES_HELP, failures), transferred)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self), CONTENT_TYPE_LATEST  # a "registry" is anything with collect()


class _InFiles(_Series):
    """Several workers' metrics: prometheus_client's, which in multiprocess mode write each update to
    this worker's files at once, so that any worker's scrape counts it."""

    def __init__(self) -> None:
        import prometheus_client as prom  # in multiprocess mode: PROMETHEUS_MULTIPROC_DIR is set

        self._prom = prom
        self.registry = r = prom.CollectorRegistry()
        self.requests = prom.Counter(REQUESTS, REQUESTS_HELP, ["route", "status"], registry=r)
        self.latency = prom.Histogram(LATENCY, LATENCY_HELP, ["route"], buckets=BUCKETS, registry=r)
        self.in_flight = prom.Gauge(IN_FLIGHT, IN_FLIGHT_HELP, registry=r, multiprocess_mode="livesum")
        self.model = prom.Gauge(MODEL, MODEL_HELP, ["version"], registry=r, multiprocess_mode="livemax")
        self.failures = prom.Counter(FAILURES, FAILURES_HELP, registry=r)
        transferred = prom.Counter(BYTES, BYTES_HELP, ["direction"], registry=r)
        self._received, self._sent = transferred.labels("received"), transferred.labels("sent")
        # (route, status) → the two series: no label lookup per request
        self._children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self._lock = threading.Lock()

    def began(self, tracker: Tracker) -> None:
        self.in_flight.inc()

    def ended(self, tracker: Tracker, status: int, seconds: float) -> None:
        key = (tracker.route, status)
        children = self._children.get(key)
        if children is None:
            with self._lock:
                children = self._children.setdefault(
                    key, (self.requests.labels(tracker.route, str(status)), self.latency.labels(tracker.route)))
        children[0].inc()
        children[1].observe(seconds)
        if tracker.route != "/metrics":  # a scrape is not the service's traffic
            if tracker.received:
                self._received.inc(tracker.received)
            if tracker.sent:
                self._sent.inc(tracker.sent)
        self.in_flight.dec()

    def swapped(self, new: str, old: str | None) -> None:
        if old is not None and old != new:
            self.model.labels(old).set(0)
        self.model.labels(new).set(1)

    def load_failed(self) -> None:
        self.failures.inc()

    def exposition(self) -> tuple[bytes, str]:
        """All workers' metrics."""
        prom = self._prom
        from prometheus_client import multiprocess

        path = os.environ[MULTIPROC_ENV]
        # The parent (functions-framework's gunicorn) has no child_exit hook to call
        # mark_process_dead from, so a worker's live gauges are dropped here once it is gone.
        for name in os.listdir(path):
            found = _LIVE_FILE.match(name)
            if found and not _alive(int(found.group(1))):
                multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]  # unannotated upstream
                    int(found.group(1)), path)
        registry = prom.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]  # unannotated upstream
        return prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST


class Metrics:
    """The inference metrics of this process (one per `Service`, each with its own series)."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.series: _Series = _InFiles() if self.multiprocess else _InMemory()

    def track(self, route: str) -> Tracker:
        return Tracker(self.series, route)

    def swapped(self, new: LoadedModel, old: LoadedModel | None) -> None:
        """PointerWatcher's on_swap: the version served."""
        self.series.swapped(new.version, old.version if old is not None else None)

    def load_failed(self) -> None:
        self.series.load_failed()

    def exposition(self) -> tuple[bytes, str]:
        """(the text a scrape gets, its content type): all workers' metrics in multiprocess mode."""
        return self.series.exposition()
