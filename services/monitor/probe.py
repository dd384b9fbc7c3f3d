"""Reads a cloud's serving processes on this machine, found by the port its endpoint listens on,
and times its endpoint from outside (`time_responses`, wherever the endpoint is).

`skyfuse up` serves each cloud's inference on 127.0.0.1 and sets that cloud's `endpoint`; the
process listening on the endpoint's port is the server (uvicorn, or gunicorn's master) and its
descendants are its workers. CPU time, memory and affinity come from psutil; the bytes from the
server's own count, `skyfuse_inference_bytes_total` on its GET /metrics. The server found is kept
until it exits, so the scan of the machine's sockets runs once per server, not once per tick.

Nothing is read (`read` returns None, the figures are null) when the endpoint is not on this
machine (a real cloud's URL: that cloud's own metrics tell them, README "Load signals"), when no
process of this user listens on its port, or without psutil (it comes with the `local` extra).
"""
from __future__ import annotations

import http.client
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from services.monitor.signals import Reading

log = logging.getLogger("skyfuse.monitor")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
BYTES_METRIC = "skyfuse_inference_bytes_total"

try:
    import psutil
except ImportError:  # a cloud's function package: no local servers to read
    psutil = None


def local_port(endpoint: str) -> int | None:
    """The port of an endpoint on this machine, or None for one elsewhere."""
    try:
        parts = urlsplit(endpoint)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    return port if parts.hostname in LOCAL_HOSTS else None


def scrape_bytes(endpoint: str, timeout_s: float = 2.0) -> float | None:
    """HTTP bytes received + sent so far by the inference server at `endpoint`, from its /metrics;
    None when it does not answer or does not count them."""
    try:
        with urllib.request.urlopen(endpoint.rstrip("/") + "/metrics", timeout=timeout_s) as response:
            text = response.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(BYTES_METRIC + "{")]
    return sum(values) if values else None


@dataclass(frozen=True)
class ResponseTimes:
    """What the probes of one tick saw: the time of each answered one, and how many failed."""

    answered_ms: list[float]
    failed: int

    @property
    def sent(self) -> int:
        return len(self.answered_ms) + self.failed


def time_responses(endpoint: str, probes: int, timeout_s: float,
                   clock: Callable[[], float] = time.perf_counter) -> ResponseTimes:
    """`probes` GET /health calls to `endpoint`, one after another, each timed from opening the
    connection to its last byte: what a caller waits, the queue before a busy server included. Any
    HTTP answer is timed (a 503 only says no model is loaded yet); no answer in `timeout_s`, a
    refused connection or another 5xx is a failure."""
    url, answered, failed = endpoint.rstrip("/") + "/health", [], 0
    for _ in range(probes):
        started = clock()
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                response.read()
            status = response.status
        except urllib.error.HTTPError as exc:  # an answer all the same
            exc.read()
            status = exc.code
        except (OSError, ValueError, http.client.HTTPException):
            failed += 1
            continue
        if status >= 500 and status != 503:
            failed += 1
        else:
            answered.append((clock() - started) * 1000.0)
    return ResponseTimes(answered, failed)


class Probe:
    """`read(endpoint)`: a `Reading` of the server behind a local endpoint, or None."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 scrape: Callable[[str], float | None] = scrape_bytes):
        self.clock, self.scrape = clock, scrape
        self._servers: dict[int, list[psutil.Process]] = {}  # port → the root processes found listening on it
        self._lock = threading.Lock()

    def read(self, endpoint: str) -> Reading | None:
        port = local_port(endpoint) if endpoint else None
        if psutil is None or port is None:
            return None
        roots = self._roots(port)
        try:
            server = tuple(sorted((p.pid, p.create_time()) for p in roots))
        except psutil.Error:  # it exited just now
            server = ()
        if not server:
            return None
        cpu_s, rss = 0.0, 0
        for process in _tree(roots):
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    cpu_s += times.user + times.system + getattr(times, "children_user", 0.0) \
                        + getattr(times, "children_system", 0.0)
                    rss += process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # a worker that just exited: its parent reaps it and counts its time
        at = self.clock()
        try:
            cores = len(roots[0].cpu_affinity())
        except (AttributeError, psutil.Error):  # no affinity on this OS
            cores = psutil.cpu_count() or 1
        return Reading(at, server, cpu_s, cores, rss, psutil.virtual_memory().total, self.scrape(endpoint))

    def _roots(self, port: int) -> list[psutil.Process]:
        """The server listening on `port`: the eldest of the processes that share its socket (the
        machine-wide scan names one of them, maybe a worker)."""
        with self._lock:
            known = self._servers.get(port)
            if known and all(_alive(p) for p in known):
                return known
            try:
                listening = {c.pid for c in psutil.net_connections(kind="tcp")
                             if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
                roots = list({root.pid: root for root in (_eldest(psutil.Process(pid), port)
                                                          for pid in sorted(listening))}.values())
            except psutil.Error as exc:
                log.debug("serving process on port %s not readable: %s", port, exc)
                roots = []
            if roots:
                self._servers[port] = roots
            else:
                self._servers.pop(port, None)
            return roots


def _listens(process: psutil.Process, port: int) -> bool:
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in process.net_connections(kind="tcp"))
    except psutil.Error:  # another user's process: not ours to read
        return False


def _eldest(process: psutil.Process, port: int) -> psutil.Process:
    """`process`, or its furthest ancestor in an unbroken line of ancestors that listen on `port`
    too (gunicorn's master above its workers, uvicorn's supervisor above its)."""
    eldest = process
    for parent in process.parents():
        if not _listens(parent, port):
            break
        eldest = parent
    return eldest


def _alive(process: psutil.Process) -> bool:
    """Running, and not a zombie its parent has yet to reap (a dead server)."""
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _tree(roots: list[psutil.Process]) -> list[psutil.Process]:
    """The roots and every descendant, each once."""
    seen: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for process in family:
            seen.setdefault(process.pid, process)
    return list(seen.values())
