"""Request latency and errors per window, and the `metrics.sampled` events built from them.

`LatencyRecorder.record` is what each request pays: a binary search, a few integer adds under an
uncontended lock. Latencies go into a fixed log-spaced histogram (1 µs to 100 s, buckets 2 %
apart), so p50/p99 cost nothing per request and are within 1 % of the exact value.
`snapshot` closes the window and returns the data of a `metrics.sampled` event (see
`events/schemas/metrics.sampled.json`); `MetricsEmitter` publishes one every `interval_s`.
"""
from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from skyfuse.payloads import MetricsSampled

MIN_MS = 0.001
MAX_MS = 100_000.0
GROWTH = 1.02
_LOG_G = math.log(GROWTH)
BUCKETS = int(math.log(MAX_MS / MIN_MS) / _LOG_G) + 1
# the lower bound of buckets 1 … BUCKETS-1 (bucket 0 takes everything below MIN_MS * GROWTH)
_EDGES_MS = tuple(MIN_MS * GROWTH ** i for i in range(1, BUCKETS))

log = logging.getLogger("skyfuse.serving.metrics")


@dataclass(frozen=True)
class Window:
    requests: int
    errors: int
    busy_s: float
    counts: list[int]
    seconds: float
    ended_at: float  # wall clock

    def percentile_ms(self, q: float) -> float | None:
        """The q-quantile (0 < q <= 1) of the window's latencies, in ms; None when empty."""
        if self.requests == 0:
            return None
        rank = max(1, math.ceil(q * self.requests))
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                ms: float = MIN_MS * GROWTH ** (i + 0.5)
                return ms
        return MAX_MS


class LatencyRecorder:
    """Latency and errors of the requests of the current window (thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time):
        """`clock` measures window lengths; `wall_clock` dates them (`sampled_at`)."""
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._reset(clock())

    def _reset(self, now: float) -> None:
        self._counts = [0] * BUCKETS
        self._n = 0
        self._errors = 0
        self._busy = 0.0
        self._started = now

    def record(self, seconds: float, error: bool = False) -> None:
        i = bisect.bisect_right(_EDGES_MS, seconds * 1000.0)
        with self._lock:
            self._counts[i] += 1
            self._n += 1
            self._busy += seconds
            if error:
                self._errors += 1

    @property
    def requests(self) -> int:
        return self._n

    def take(self) -> Window:
        """Close the current window and start a new one."""
        with self._lock:
            now = self._clock()
            window = Window(self._n, self._errors, self._busy, self._counts, max(now - self._started, 1e-9),
                            self._wall_clock())
            self._reset(now)
        return window

    def snapshot(self, cloud: str, *, price_per_hour: float, price_per_million_requests: float,
                 currency: str = "USD", model_version: str | None = None, window_s: float | None = None,
                 capacity_rps: float | None = None, replicas: int | None = None, workers: int = 1) -> MetricsSampled:
        """Close the window; the data of a `metrics.sampled` event (source "inference").

        `window_s`: the window's length to report (default: the time since the last snapshot).
        `load`: the share of the window this process spent serving requests, over `workers`
        requests that can run at once, capped at 1. `error_rate`: 5xx answers / requests.
        """
        w = self.take()
        length = float(window_s) if window_s else w.seconds
        p50, p99 = w.percentile_ms(0.5), w.percentile_ms(0.99)
        data: MetricsSampled = {
            "cloud": cloud,
            "source": "inference",
            "window_s": round(length, 3) or 0.001,
            "sampled_at": datetime.fromtimestamp(w.ended_at, UTC).isoformat(timespec="milliseconds")
                                  .replace("+00:00", "Z"),
            "requests": w.requests,
            "requests_per_s": round(w.requests / length, 3),
            "latency_ms": {"p50": None if p50 is None else round(p50, 4),
                           "p99": None if p99 is None else round(p99, 4)},
            "error_rate": round(w.errors / w.requests, 6) if w.requests else 0.0,
            "load": round(min(1.0, w.busy_s / (length * max(1, workers))), 6),
            "price": {"per_hour": float(price_per_hour), "per_million_requests": float(price_per_million_requests),
                      "currency": currency},
            "model_version": model_version,
        }
        if capacity_rps:
            data["capacity_rps"] = float(capacity_rps)
        if replicas is not None:
            data["replicas"] = int(replicas)
        return data


class MetricsEmitter(threading.Thread):
    """Every `interval_s`, one snapshot of the recorder, handed to `publish` (e.g. a function
    that calls `Runtime.emit("metrics.sampled", data)`): one event per window, not per request.

    `describe()` returns the snapshot's keyword arguments at that moment (cloud, prices, the
    model version served)."""

    def __init__(self, recorder: LatencyRecorder, publish: Callable[[MetricsSampled], object],
                 describe: Callable[[], dict[str, Any]], interval_s: float = 30.0):
        super().__init__(name="skyfuse-metrics-emitter", daemon=True)
        self.recorder, self.publish, self.describe, self.interval_s = recorder, publish, describe, interval_s
        self._stop_event = threading.Event()
        self.emitted = 0
        self.failures = 0
        self.last_error: str | None = None

    def emit_once(self) -> MetricsSampled | None:
        try:
            data = self.recorder.snapshot(**self.describe())
            self.publish(data)
        except Exception as exc:  # noqa: BLE001 - serving goes on when the bus is down
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("metrics.sampled not published: %s", self.last_error)
            return None
        self.emitted += 1
        return data

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.emit_once()

    def stop(self, flush: bool = False, timeout: float | None = 5.0) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
        if flush:
            self.emit_once()
