"""The monitor's core: on a timer, in every cloud, reports that cloud's load and current prices.

Load is measured on the cloud's serving processes, not the machine (`signals` defines each figure,
`probe` finds and reads the processes): `cpu_utilisation`, `memory_utilisation` and
`network_bytes_per_s` over the window since the previous tick, and `load` = the CPU utilisation
(0 while no serving process is found). Each figure is null when it cannot be measured: the first
tick, a server restarted or gone, or a cloud whose endpoint is not on this machine.

Response time is measured from outside: `[monitor] probes` GET /health calls to the endpoint, each
timed from connection to last byte, so it includes the queue before a busy server reads a request,
which the server's own timing cannot see. The sample's `requests` are the probes sent, its latency
their p50/p99 (null when none answered) and its `error_rate` the share that failed.

Prices come from the fleet config, read again on every tick, so a price change in the file reaches
the scheduler within one period. User traffic figures come from the inference functions' own
metrics.sampled events.
"""
from __future__ import annotations

import math
import threading
from datetime import UTC, datetime

from services.monitor.probe import Probe, ResponseTimes, time_responses
from services.monitor.signals import Reading, figures
from skyfuse import config as fleet_config
from skyfuse.payloads import Latency
from skyfuse.runtime.function import Runtime

_lock = threading.Lock()
_probe = Probe()
_previous: dict[str, Reading] = {}  # cloud → its reading at the previous tick (one process may monitor several)


def on_timer(runtime: Runtime) -> None:
    try:
        fleet = fleet_config.load()
    except fleet_config.ConfigError as exc:  # keep the last good prices; say why
        runtime.log.warning("fleet config unreadable; keeping the last prices", extra={"error": str(exc)})
        fleet = runtime.fleet
    cloud = fleet.clouds.get(runtime.cloud) or runtime.fleet.clouds[runtime.cloud]
    live = runtime.fleet.clouds.get(runtime.cloud)
    endpoint = (live.endpoint if live else "") or cloud.endpoint  # `skyfuse up` sets the live one
    try:
        reading = _probe.read(endpoint) if endpoint else None
    except Exception as exc:  # noqa: BLE001 - the prices and the sample go out all the same
        runtime.log.warning("serving processes not readable; figures null", extra={"error": repr(exc)})
        reading = None
    with _lock:
        previous = _previous.pop(runtime.cloud, None)
        if reading is not None:
            _previous[runtime.cloud] = reading
    measured = figures(previous, reading)
    window_s = max(0.001, round(measured.window_s or fleet.training.timer_s, 3))
    settings = runtime.fleet.monitor  # as the process started (prices, below, are read again each tick)
    probed = time_responses(endpoint, settings.probes, settings.probe_timeout_s) if endpoint else ResponseTimes([], 0)
    runtime.emit("metrics.sampled", {
        "cloud": runtime.cloud, "source": "monitor", "window_s": window_s,
        "sampled_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "requests": probed.sent, "requests_per_s": round(probed.sent / window_s, 3),
        "latency_ms": percentiles(probed.answered_ms),
        "error_rate": round(probed.failed / probed.sent, 4) if probed.sent else 0.0,
        "load": round(measured.cpu_utilisation or 0.0, 4), **measured.to_data(), "capacity_rps": cloud.capacity_rps,
        "price": {"per_hour": cloud.price_per_hour, "per_million_requests": cloud.price_per_million_requests,
                  "currency": "USD"},
    })


def percentiles(times_ms: list[float]) -> Latency:
    """p50 and p99 by nearest rank (with a few probes p99 is the slowest: the wait to fear)."""
    if not times_ms:
        return {"p50": None, "p99": None}
    ordered = sorted(times_ms)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"p50": round(rank(0.5), 3), "p99": round(rank(0.99), 3)}
