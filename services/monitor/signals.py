"""The load signals of a cloud's serving processes over one window, from two readings.

Pure: no psutil, no HTTP, no clock. `probe.read` takes a `Reading` at each timer tick; `figures`
turns the previous one and the current one into what `metrics.sampled` reports:

    cpu_utilisation     = Δ CPU seconds / (Δ t · cores)          in [0, 1]
    memory_utilisation  = resident bytes / the machine's memory   in [0, 1], at the end of the window
    network_bytes_per_s = Δ (bytes received + bytes sent) / Δ t

CPU seconds are user + system time of the server's processes (the process listening on the
endpoint and all its descendants: gunicorn's or uvicorn's workers) plus the time of the ones they
have already reaped, so a worker that exits within the window still counts. `cores` is the number
of CPUs those processes may run on (their affinity): the share of the allotment in use, as a
cloud's CPU utilisation is the share of the vCPUs of its VM or container. Bytes are the HTTP
bodies the inference server counted itself (Linux has no per-process network counters).

A figure is None when it cannot be told honestly: no reading (no server found), no previous reading
or a different server than last time (a restart: the counters started again), a counter that went
backwards, or a window of no length.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reading:
    """One look at a cloud's serving processes."""

    at: float  # monotonic seconds
    server: tuple[tuple[int, float], ...]  # who was read, (pid, start time) per root: another value is a restart
    cpu_s: float  # CPU seconds used so far by the processes (and the children they reaped)
    cores: int  # CPUs the processes may run on
    rss_bytes: int  # resident memory of the processes now
    memory_bytes: int  # the machine's memory
    net_bytes: float | None  # HTTP bytes received + sent so far by the server; None: unknown


@dataclass(frozen=True)
class Figures:
    cpu_utilisation: float | None = None
    memory_utilisation: float | None = None
    network_bytes_per_s: float | None = None
    window_s: float | None = None  # the length of the window the rates are over

    def to_data(self) -> dict[str, float | None]:
        """The `metrics.sampled` fields."""
        return {"cpu_utilisation": _round(self.cpu_utilisation), "memory_utilisation": _round(self.memory_utilisation),
                "network_bytes_per_s": None if self.network_bytes_per_s is None else round(self.network_bytes_per_s, 1)}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _fraction(x: float) -> float:
    return min(1.0, max(0.0, x))


def figures(previous: Reading | None, current: Reading | None) -> Figures:
    """The load signals of the window from `previous` to `current` (see the module doc)."""
    if current is None:
        return Figures()
    memory = _fraction(current.rss_bytes / current.memory_bytes) if current.memory_bytes > 0 else None
    if previous is None or previous.server != current.server:
        return Figures(memory_utilisation=memory)
    window = current.at - previous.at
    if window <= 0:
        return Figures(memory_utilisation=memory)
    used = current.cpu_s - previous.cpu_s
    cpu = _fraction(used / (window * current.cores)) if used >= 0 and current.cores > 0 else None
    network = None
    if current.net_bytes is not None and previous.net_bytes is not None and current.net_bytes >= previous.net_bytes:
        network = (current.net_bytes - previous.net_bytes) / window
    return Figures(cpu, memory, network, window)
