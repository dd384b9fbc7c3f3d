"""The monitor on real processes: it finds a cloud's server by the port of its endpoint, reports the
CPU its processes (workers included) burn, their memory, and the bytes a real inference server
counted, in metrics.sampled events that pass the schema; a server that is gone gives null figures.

CPU bounds are coarse on purpose (a 2-core machine shared with other work): a worker spinning
reaches more than 0.3 of a core in at least one of ten one-second windows, a sleeping server stays
under 0.2 of a core in every window."""
from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import orjson
import psutil
import pytest

from services.monitor import handler as monitor
from services.monitor.probe import time_responses
from skyfuse import config, contracts
from skyfuse.bus import open_bus
from skyfuse.dev import hosts
from skyfuse.runtime.function import Runtime, hosted
from skyfuse.serving import testing
from skyfuse.serving.model import publish
from skyfuse.storage import open_store
from tests.conftest import fleet_env
from tests.integration.test_inference_hosts import host_env
from tests.integration.test_inference_prometheus import call

WINDOW_S = 1.0
# An HTTP server that answers every request at once (501); with "busy" it forks a worker, as
# gunicorn does, that spins while the server itself sleeps in select().
SERVER = """
import http.server, os, sys
server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
if sys.argv[1] == "busy" and os.fork() == 0:
    while True:
        pass
print(server.server_address[1], flush=True)
server.serve_forever()
"""


class Monitor:
    """The monitor's core for some clouds, called as the fleet's timer calls it."""

    def __init__(self, tmp_path, endpoints: dict[str, str], probes: int = 3):
        monitor._previous.clear()  # a fresh monitor process
        fleet = config.load(environ=fleet_env("embedded", tmp_path, SKYFUSE_SIGNING__ENABLED="false",
                                              SKYFUSE_MONITOR__PROBES=str(probes)))
        for cloud, url in endpoints.items():
            fleet.clouds[cloud].endpoint = url  # as `skyfuse up` sets it
        bus = open_bus(fleet)
        self.runtimes = {cloud: Runtime(cloud, "monitor", fleet, bus_factory=lambda: bus) for cloud in endpoints}

    def tick(self) -> dict[str, dict]:
        """One timer tick in every cloud: cloud → the metrics.sampled data it emitted (schema-checked)."""
        out = {}
        for cloud, runtime in self.runtimes.items():
            with hosted(runtime):
                monitor.on_timer(runtime)
            data = runtime.emitted[-1].get_data()
            contracts.validate("metrics.sampled", data)
            assert data["source"] == "monitor" and data["cloud"] == cloud
            out[cloud] = data
        return out


@pytest.fixture
def servers():
    started: dict[str, subprocess.Popen] = {}

    def start(mode: str) -> tuple[str, subprocess.Popen]:
        process = subprocess.Popen([sys.executable, "-c", SERVER, mode], stdout=subprocess.PIPE, text=True,
                                   start_new_session=True)
        started[mode] = process
        port = int(process.stdout.readline())
        return f"http://127.0.0.1:{port}", process

    yield start
    for process in started.values():
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the server and its worker
        except ProcessLookupError:
            pass
        process.wait(10)


def cores_used(data: dict, process: subprocess.Popen) -> float:
    return data["cpu_utilisation"] * len(psutil.Process(process.pid).cpu_affinity())


def test_a_busy_worker_reads_high_and_a_sleeping_server_low(tmp_path, servers):
    busy_url, busy = servers("busy")
    idle_url, idle = servers("idle")
    m = Monitor(tmp_path, {"aws": busy_url, "gcp": idle_url})
    first = m.tick()
    for data in first.values():  # no window yet: no rate, but memory
        assert data["cpu_utilisation"] is None and data["load"] == 0.0 and data["memory_utilisation"] > 0
    busy_cores, idle_cores = [], []
    while len(busy_cores) < 10 and not (busy_cores and max(busy_cores) > 0.3 and len(idle_cores) >= 3):
        time.sleep(WINDOW_S)  # the measuring window
        got = m.tick()
        busy_cores.append(cores_used(got["aws"], busy))
        idle_cores.append(cores_used(got["gcp"], idle))
        for data in got.values():
            assert data["load"] == data["cpu_utilisation"]  # load is the CPU utilisation
            assert 0 < data["memory_utilisation"] < 1
            assert data["network_bytes_per_s"] is None  # this server counts no bytes
            assert data["window_s"] > 0
    assert max(busy_cores) > 0.3, f"a spinning worker used at most {max(busy_cores):.2f} of a core: {busy_cores}"
    assert max(idle_cores) < 0.2, f"a sleeping server used {max(idle_cores):.2f} of a core: {idle_cores}"

    os.killpg(busy.pid, signal.SIGKILL)
    busy.wait(10)  # reaped: gone; a zombie counts as gone as well (below)
    gone = m.tick()["aws"]
    assert (gone["cpu_utilisation"], gone["memory_utilisation"], gone["network_bytes_per_s"], gone["load"]) == \
           (None, None, None, 0.0)


def test_a_cloud_served_elsewhere_or_nowhere_reports_null(tmp_path):
    m = Monitor(tmp_path, {"aws": "https://abc.lambda-url.us-east-1.on.aws", "gcp": "", "azure": "http://127.0.0.1:9"},
                probes=0)  # no calls leave this machine
    for _ in range(2):
        for data in m.tick().values():
            assert data["cpu_utilisation"] is None and data["memory_utilisation"] is None
            assert data["network_bytes_per_s"] is None and data["load"] == 0.0


@pytest.mark.parametrize("provider, workers", [("aws", 1), ("gcp", 2)])
def test_a_real_inference_server_reports_its_bytes_and_its_workers(tmp_path, provider, workers):
    """The bytes of the window are exactly the request and response bodies sent and answered in it
    (as `skyfuse up` runs it: one uvicorn process; gunicorn with two workers, whose counts add up
    in any worker's /metrics); the memory is the server's and its workers'."""
    store_uri, env = host_env(provider, tmp_path, INFERENCE_METRICS_S="0", WORKERS=str(workers))
    publish(open_store(store_uri), "v1", testing.classifier(seed=1))
    host = hosts.start(provider, env=env, log_dir=tmp_path)
    try:
        while call(host.url, "GET", "/health")[0] != 200:  # the model loaded
            time.sleep(0.05)
        m = Monitor(tmp_path / "monitor", {provider: host.url}, probes=0)  # only the requests below
        m.tick()
        sent = 0
        for k in range(40):
            body = orjson.dumps({"instances": [[5.1, 3.5, 1.4, 0.2 + k / 100]] * (1 + k % 5)})
            status, answer, _ = call(host.url, "POST", "/predict", body)
            assert status == 200, answer
            sent += len(body) + len(answer)
        got = m.tick()[provider]
        # window_s is reported to the millisecond (the window here is tens of ms): allow that rounding
        rounding = got["network_bytes_per_s"] * 0.0005 + 0.05 * got["window_s"]
        assert got["network_bytes_per_s"] * got["window_s"] == pytest.approx(sent, abs=rounding + 1)
        assert got["cpu_utilisation"] is not None and 0 < got["memory_utilisation"] < 1
        server = psutil.Process(host.pid)
        family = [server, *server.children(recursive=True)]
        assert len(family) >= 1 + (workers > 1) * workers
        measured = got["memory_utilisation"] * psutil.virtual_memory().total
        assert measured == pytest.approx(sum(p.memory_info().rss for p in family), rel=0.1)  # the workers count
    finally:
        host.stop()


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200  # of /health

    def do_GET(self):  # the http.server name
        self.send_response(self.status if self.path == "/health" else 404)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_probes_time_the_wait_a_caller_sees_the_queue_included():
    """A server busy with one request (here: one whose headers are still arriving) leaves a probe
    waiting in its queue before it even reads it; the probe's time includes that wait, which the
    server's own timing of /health (microseconds) never shows."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)  # one request at a time
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    calls: list[float] = []

    def clock() -> float:  # the real clock, each reading kept
        calls.append(time.perf_counter())
        return calls[-1]

    released: list[float] = []

    def release(sock):
        released.append(time.perf_counter())
        sock.sendall(b"\r\n")

    try:
        blocker = socket.create_connection(server.server_address)  # accepted first: the accept queue is FIFO
        blocker.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the blank line comes later
        timer = threading.Timer(0.2, release, [blocker])
        timer.start()
        probed = time_responses(url, 3, timeout_s=10, clock=clock)
        timer.join()
        blocker.close()
        assert probed.failed == 0 and len(probed.answered_ms) == 3
        first_started = calls[0]
        assert first_started + probed.answered_ms[0] / 1000 >= released[0]  # answered only after the release
    finally:
        server.shutdown()
        server.server_close()


def test_a_sample_carries_its_probes(tmp_path):
    """Each tick's sample: the probes sent as its requests, their p50/p99 as its latency, the share
    that failed as its error rate (a refused endpoint: all errors, no latency)."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        m = Monitor(tmp_path, {"aws": f"http://127.0.0.1:{server.server_address[1]}", "azure": "http://127.0.0.1:9"},
                    probes=4)
        got = m.tick()
        aws, azure = got["aws"], got["azure"]
        assert aws["requests"] == 4 and aws["error_rate"] == 0.0
        assert 0 < aws["latency_ms"]["p50"] <= aws["latency_ms"]["p99"]
        assert azure["requests"] == 4 and azure["error_rate"] == 1.0
        assert azure["latency_ms"] == {"p50": None, "p99": None}
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status, failed", [(503, 0), (500, 3), (404, 0)])
def test_a_503_is_an_answer_other_5xx_are_failures(status, failed):
    """503 only says no model is loaded yet (a cloud before its first deployment): timed, not an
    error; a 500 is a broken server."""
    server = http.server.HTTPServer(("127.0.0.1", 0), type("Answer", (_Health,), {"status": status}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        probed = time_responses(f"http://127.0.0.1:{server.server_address[1]}", 3, timeout_s=10)
        assert probed.failed == failed and len(probed.answered_ms) == 3 - failed
    finally:
        server.shutdown()
        server.server_close()


def test_percentiles_by_nearest_rank():
    assert monitor.percentiles([]) == {"p50": None, "p99": None}
    assert monitor.percentiles([3.0, 1.0, 2.0]) == {"p50": 2.0, "p99": 3.0}
    assert monitor.percentiles([float(k) for k in range(1, 201)]) == {"p50": 100.0, "p99": 198.0}
