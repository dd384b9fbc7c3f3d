"""The monitor's core: on a timer, in every cloud, reports that cloud's load and current prices.

Prices come from the fleet config, read again on every tick, so a price change in the file reaches
the scheduler within one period. Request figures come from the inference functions' own
metrics.sampled events; this one carries no requests (latency is null).
"""
from __future__ import annotations

import os
from datetime import datetime, timezone

from skyfuse import config as fleet_config
from skyfuse.runtime.function import Runtime


def on_timer(runtime: Runtime) -> None:
    try:
        fleet = fleet_config.load()
    except fleet_config.ConfigError as exc:  # keep the last good prices; say why
        runtime.log.warning("fleet config unreadable; keeping the last prices", extra={"error": str(exc)})
        fleet = runtime.fleet
    cloud = fleet.clouds.get(runtime.cloud) or runtime.fleet.clouds[runtime.cloud]
    load = min(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    runtime.emit("metrics.sampled", {
        "cloud": runtime.cloud, "source": "monitor", "window_s": fleet.training.timer_s,
        "sampled_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "requests": 0, "requests_per_s": 0.0, "latency_ms": {"p50": None, "p99": None}, "error_rate": 0.0,
        "load": round(load, 4), "capacity_rps": cloud.capacity_rps,
        "price": {"per_hour": cloud.price_per_hour, "per_million_requests": cloud.price_per_million_requests,
                  "currency": "USD"},
    })
