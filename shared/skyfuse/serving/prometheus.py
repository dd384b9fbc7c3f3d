"""Prometheus metrics of an inference host, served at GET /metrics (open, like /health).

    skyfuse_inference_requests_total{route, status}           requests answered, by route template
    skyfuse_inference_request_duration_seconds{route}         latency histogram (50 µs to 10 s)
    skyfuse_inference_requests_in_flight                      requests being answered now
    skyfuse_inference_model_info{version}                     1 for the version served, 0 for earlier ones
    skyfuse_inference_model_load_failures_total               models the pointer named that failed to load
    skyfuse_inference_bytes_total{direction}                  HTTP body bytes received and sent (scrapes not counted)

`route` is a template ("/predict", "/v2/models/{name}/infer", ..., "unmatched" for any other
path), so a scanner cannot grow the number of series.

One process (uvicorn) keeps its metrics in memory. Several worker processes (gunicorn, `WORKERS`)
share them through files in `PROMETHEUS_MULTIPROC_DIR` (prometheus_client's multiprocess mode): the
parent calls `prepare_workers` before it forks, and any worker's /metrics then adds up all of them.
prometheus_client picks its mode when it is first imported, so it is imported here only when a
`Metrics` is made, in the serving process, never at module import.
"""
from __future__ import annotations

import atexit
import glob
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import MutableMapping
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # prometheus_client is imported when a Metrics is made (see above)
    from prometheus_client import Counter, Histogram

    from skyfuse.serving.model import LoadedModel

log = logging.getLogger("skyfuse.serving.prometheus")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The core answers in tens of µs; a 5 ms first bucket (the default's) would hide everything.
BUCKETS = (5e-05, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
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

    __slots__ = ("metrics", "route", "status", "started", "received", "sent", "finished")

    def __init__(self, metrics: Metrics, route: str):
        self.metrics, self.route = metrics, route
        self.status: int | None = None
        self.received = self.sent = 0  # body bytes, noted by the host (the monitor's network figure)
        self.finished = False

    def __enter__(self) -> Tracker:
        self.metrics.in_flight.inc()
        self.started = time.perf_counter()
        return self

    def finish(self, failed: bool = False) -> None:
        if self.finished:
            return
        self.finished = True
        elapsed = time.perf_counter() - self.started
        status = 500 if failed or self.status is None else self.status
        self.metrics.observe(self.route, status, elapsed)
        if self.route != "/metrics":  # a scrape is not the service's traffic
            self.metrics.transferred(self.received, self.sent)
        self.metrics.in_flight.dec()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.finish(failed=kind is not None)


class Metrics:
    """The inference metrics of this process (one per `Service`, each with its own registry)."""

    def __init__(self) -> None:
        import prometheus_client as prom  # here: its mode (one process or many) is fixed on import

        self._prom = prom
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("skyfuse_inference_requests", "Requests answered, by route template and HTTP "
                                     "status.", ["route", "status"], registry=r)
        self.latency = prom.Histogram("skyfuse_inference_request_duration_seconds", "Time to answer a request, "
                                      "by route template.", ["route"], buckets=BUCKETS, registry=r)
        self.in_flight = prom.Gauge("skyfuse_inference_requests_in_flight", "Requests being answered now.",
                                    registry=r, multiprocess_mode="livesum")
        self.model = prom.Gauge("skyfuse_inference_model_info", "1 for the model version served (0: served "
                                "before).", ["version"], registry=r, multiprocess_mode="livemax")
        self.load_failures = prom.Counter("skyfuse_inference_model_load_failures", "Models the serving pointer "
                                          "named that failed to load (each attempt).", registry=r)
        self.bytes = prom.Counter("skyfuse_inference_bytes", "HTTP body bytes, by direction (received, sent); "
                                  "GET /metrics itself is not counted.", ["direction"], registry=r)
        self._received, self._sent = self.bytes.labels("received"), self.bytes.labels("sent")
        # (route, status) → the two series: no label lookup per request
        self._children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self._lock = threading.Lock()

    def track(self, route: str) -> Tracker:
        return Tracker(self, route)

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        children = self._children.get(key)
        if children is None:
            with self._lock:
                children = self._children.setdefault(
                    key, (self.requests.labels(route, str(status)), self.latency.labels(route)))
        children[0].inc()
        children[1].observe(seconds)

    def transferred(self, received: int, sent: int) -> None:
        if received:
            self._received.inc(received)
        if sent:
            self._sent.inc(sent)

    def swapped(self, new: LoadedModel, old: LoadedModel | None) -> None:
        """PointerWatcher's on_swap: the version served."""
        if old is not None and old.version != new.version:
            self.model.labels(old.version).set(0)
        self.model.labels(new.version).set(1)

    def load_failed(self) -> None:
        self.load_failures.inc()

    def exposition(self) -> tuple[bytes, str]:
        """(the text a scrape gets, its content type): all workers' metrics in multiprocess mode."""
        prom = self._prom
        if not self.multiprocess:
            return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
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
