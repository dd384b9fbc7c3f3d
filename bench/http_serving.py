"""Group `http`: inference over HTTP, each cloud's host against the floor and against BentoML.

Every server serves the same model (the bench's 30→32→16→2 MLP) with one onnxruntime thread and
the same number of worker processes (`BENCH_WORKERS`, default 1), on 127.0.0.1:

| server | what |
| --- | --- |
| floor | `bench/floor_app.py`, a bare ASGI app on uvicorn: read body, orjson parse, run, orjson answer |
| aws, gcp, azure | skyfuse's hosts, started by `skyfuse.dev.hosts.start` as the tests start them |
| bentoml | the peer, `bench/peer_bentoml.py`, from its own venv `build/bench/bentoml` (made on first use) |

The load generator runs in its own process: wrk (installed with apt-get when missing and we are
root), else a small Python client. Per server: POST /predict at batch 1 over one connection (p50),
at batch 1 over 8 connections (req/s, p50, p99, and the server's CPU per request: the CPU time of
its process tree across the run over the requests answered), and at batch 64 over one connection
(p50). All servers are up at once and each load runs in rounds that go through them in turn, so a
burst of other work on the machine lands on one round of each; every figure is the median round.
The in-process core (`skyfuse.serving.api.predict`, batch 1) is the floor of p50.

    .venv/bin/python bench/suite.py --only http [--smoke]     # BENCH_WORKERS=2 for two workers each
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import psutil

from harness import BENCH, REPO, Context, Goal  # first: harness puts the project's modules on sys.path
from skyfuse.dev import hosts
from skyfuse.serving import api, testing
from skyfuse.serving.model import LoadedModel, ModelSlot, publish
from skyfuse.storage import open_store

WIDTH = 30
PEER_VENV = REPO / "build" / "bench" / "bentoml"
ROUNDS = 5  # of every load on every server, interleaved
# What limits a host where it misses a goal, from py-spy profiles on this kind of machine (the
# servers under wrk) and servers that do less (the floor's work inside functions-framework, the
# core without its metrics); shown beside a miss. Every host pays uvicorn and the kernel's two
# writes a response as the floor does; the core adds its checks of the body, the answer's labels
# and the request's metrics (about 30 µs of CPU).
LIMITS = {
    "aws": "Powertools' HttpResolverLocal (the proxy event, route match, middleware chain and response "
           "builder Lambda runs for every request): driven in process without sockets, the aws app costs "
           "about 56 µs a request against the floor app's 12, of which Powertools about 21 and the core "
           "with the host's body guard about 34 (onnxruntime's run 11 of them)",
    "gcp": "functions-framework's ASGI stack (Starlette's middlewares, router and Request/Response, "
           "an execution id drawn per request) on gunicorn's uvicorn worker: driven in process without "
           "sockets, the gcp app costs about 52 µs a request against the floor app's 12, of which "
           "functions-framework and Starlette about 22 and the core with the entry point about 29 "
           "(onnxruntime's run 11 of them)",
    "azure": "the azure.functions HttpRequest/HttpResponse (werkzeug headers) per request on top of "
             "the core",
}


@dataclass
class Load:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float


@dataclass
class Server:
    name: str
    url: str  # POST /predict here
    pid: int  # root of the server's process tree
    stop: object  # () -> None


# ---- the model and the bodies ----------------------------------------------------------------

def model_bytes() -> bytes:
    return testing.classifier(width=WIDTH, classes=("malignant", "benign"), hidden=(32, 16), seed=0)


def body(batch: int) -> bytes:
    rows = np.random.default_rng(0).normal(size=(batch, WIDTH)).round(4)
    return orjson.dumps({"instances": rows.tolist()})


def core_p50_ms(data: bytes, payload: bytes, seconds: float) -> float:
    """p50 of one call of the in-process core (parse + run + serialize), batch 1."""
    slot = ModelSlot()
    slot.swap(LoadedModel(data, "bench"))
    times, clock, stop_at = [], time.perf_counter_ns, time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        for _ in range(100):
            started = clock()
            api.predict(payload, slot)
            times.append(clock() - started)
    return float(np.percentile(times, 50)) / 1e6


# ---- the load generator (its own process) ------------------------------------------------------

def load_generator() -> str:
    """'wrk' when it is (or can be made) available, else 'python'."""
    if shutil.which("wrk") is None and hasattr(os, "geteuid") and os.geteuid() == 0:
        for step in (["apt-get", "install", "-y", "wrk"], ["apt-get", "update"], ["apt-get", "install", "-y", "wrk"]):
            if subprocess.run(step, capture_output=True, timeout=300).returncode == 0 and shutil.which("wrk"):
                break
    return "wrk" if shutil.which("wrk") else "python"


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(url: str, script: Path, seconds: int, connections: int) -> Load:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 30)
    text = out.stdout
    if out.returncode != 0 or "Requests/sec" not in text:
        raise RuntimeError(f"wrk failed on {url}: {text}{out.stderr}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if bad or "Socket errors" in text:
        raise RuntimeError(f"{url} answered errors under load:\n{text}")
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", text, re.MULTILINE))
    return Load(int(re.search(r"(\d+) requests in", text).group(1)),
                float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)), _ms(pct["50"]), _ms(pct["99"]))


def run_python(url: str, payload: Path, seconds: float, connections: int) -> Load:
    """The fallback: this file as a client process, one thread and keep-alive connection each."""
    out = subprocess.run([sys.executable, __file__, "--load", url, str(payload), str(seconds), str(connections)],
                         capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"python load generator failed on {url}: {out.stderr[-2000:]}")
    return Load(**json.loads(out.stdout))


def python_client(url: str, payload: bytes, seconds: float, connections: int) -> dict:
    port, path = int(url.split(":")[2].split("/")[0]), "/" + url.split("/", 3)[3]
    latencies: list[list[float]] = [[] for _ in range(connections)]
    bad = [0] * connections
    stop_at = time.perf_counter() + seconds

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        while (start := time.perf_counter()) < stop_at:
            conn.request("POST", path, payload, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            latencies[k].append(time.perf_counter() - start)
            bad[k] += response.status != 200
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(connections)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if sum(bad):
        raise SystemExit(f"{url}: {sum(bad)} answers were not 200")
    ms = np.concatenate([np.array(x) for x in latencies]) * 1000
    return {"requests": len(ms), "rps": len(ms) / (time.perf_counter() - started),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


# ---- the servers -------------------------------------------------------------------------------

def tree_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process and all its descendants, now."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def stop_tree(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM to the server, then SIGKILL to whatever of its tree is left (BentoML's workers sit
    in process groups of their own)."""
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    for proc in tree:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def wait_ready(url: str, payload: bytes, process: subprocess.Popen, log: Path, timeout_s: float = 120.0) -> None:
    """Until POST /predict answers 200 (every server here answers 503 or nothing before its model)."""
    port, path = int(url.split(":")[2].split("/")[0]), "/" + url.split("/", 3)[3]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{url}: server exited with {process.returncode}\n{tail}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("POST", path, payload, {"Content-Type": "application/json"})
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s\n{log.read_text(errors='replace')[-3000:]}")


def spawn(name: str, argv: list[str], env: dict, url: str, payload: bytes, workdir: Path) -> Server:
    log = workdir / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(url, payload, process, log)
    except BaseException:
        stop_tree(process)
        raise
    return Server(name, url, process.pid, lambda: stop_tree(process))


def start_floor(model_path: Path, workers: int, payload: bytes, workdir: Path) -> Server:
    port = hosts.free_port()
    argv = [sys.executable, "-m", "uvicorn", "floor_app:app", "--app-dir", str(BENCH), "--host", "127.0.0.1",
            "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--lifespan", "off",
            "--no-access-log", "--log-level", "warning", "--workers", str(workers)]
    env = {**os.environ, "FLOOR_MODEL": str(model_path)}
    return spawn("floor", argv, env, f"http://127.0.0.1:{port}/predict", payload, workdir)


def start_host(provider: str, data: bytes, workers: int, payload: bytes, workdir: Path) -> Server:
    """A file store per cloud holding the model, the fleet config in env."""
    store_uri = f"file://{workdir}/store-{provider}"
    publish(open_store(store_uri), "bench-v1", data)
    config = workdir / "skyfuse.toml"
    config.write_text("")
    env = {"SKYFUSE_CONFIG": str(config), "SKYFUSE_CLOUD": provider,
           f"SKYFUSE_CLOUDS__{provider.upper()}__STORE": store_uri,
           "SKYFUSE_BUS__EMBEDDED__PATH": str(workdir / "bus"), "INFERENCE_METRICS_S": "30"}
    host = hosts.start(provider, env=env, workers=workers, log_dir=workdir)
    url = f"{host.url}/predict"
    try:
        wait_ready(url, payload, host.process, host.log_path)
    except BaseException:
        host.stop()
        raise
    return Server(provider, url, host.pid, host.stop)


def peer_venv(ctx: Context) -> Path:
    """build/bench/bentoml with bentoml, onnxruntime and numpy; made once, reused after."""
    python = PEER_VENV / "bin" / "python"
    check = [str(python), "-c", "import bentoml, onnxruntime, numpy"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    ctx.progress(f"http: installing BentoML into {PEER_VENV.relative_to(REPO)} (once)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEER_VENV)], check=True, capture_output=True)
    out = subprocess.run([str(python), "-m", "pip", "install", "-q", "bentoml", "onnxruntime", "numpy"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"pip install bentoml failed: {out.stderr[-1500:]}")
    return python


def start_peer(python: Path, model_path: Path, workers: int, payload: bytes, workdir: Path) -> Server:
    port = hosts.free_port()
    argv = [str(python), "-m", "bentoml", "serve", "peer_bentoml:Classifier", "--working-dir", str(BENCH),
            "--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PEER_MODEL=str(model_path), PEER_WORKERS=str(workers), BENTOML_DO_NOT_TRACK="True",
               BENTOML_HOME=str(workdir / "bentoml-home"))
    return spawn("bentoml", argv, env, f"http://127.0.0.1:{port}/predict", payload, workdir)


def peer_version(python: Path) -> str:
    out = subprocess.run([str(python), "-c", "import bentoml; print(bentoml.__version__)"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


# ---- measuring ---------------------------------------------------------------------------------

def measure(ctx: Context, servers: list[Server], generator: str, bodies: dict[int, Path],
            scripts: dict[int, Path]) -> dict[str, dict]:
    """Every server through every load, in interleaved rounds (a burst of other work on the machine
    then hits one round of each server, not all of one server); the median round of each figure."""
    rounds = 1 if ctx.smoke else ROUNDS
    short, long = 1, int(ctx.seconds(2, 1))  # seconds per round (wrk takes whole ones): c=8 10 s in all
    loads = {"c1": (1, 1, short), "c8": (1, 8, long), "b64": (64, 1, short)}  # batch, connections, seconds
    seen: dict[str, dict[str, list]] = {s.name: {k: [] for k in (*loads, "cpu_us")} for s in servers}

    def load(server: Server, batch: int, connections: int, seconds: int) -> Load:
        if generator == "wrk":
            return run_wrk(server.url, scripts[batch], seconds, connections)
        return run_python(server.url, bodies[batch], seconds, connections)

    if not ctx.smoke:
        for server in servers:
            load(server, 1, 8, 1)  # warm up: connections, allocator, caches
    for kind, (batch, connections, seconds) in loads.items():
        for r in range(rounds):
            for server in servers[r % len(servers):] + servers[:r % len(servers)]:
                cpu_before = tree_cpu_s(server.pid)
                result = load(server, batch, connections, seconds)
                seen[server.name][kind].append(result)
                if kind == "c8":
                    seen[server.name]["cpu_us"].append((tree_cpu_s(server.pid) - cpu_before) / result.requests * 1e6)
    results = {}
    for name, runs in seen.items():
        def median(kind: str, field: str | None = None, runs: dict = runs) -> float:
            return float(np.median([getattr(x, field) if field else x for x in runs[kind]]))
        results[name] = got = {"p50_c1": median("c1", "p50_ms"), "rps_c8": median("c8", "rps"),
                               "p50_c8": median("c8", "p50_ms"), "p99_c8": median("c8", "p99_ms"),
                               "p50_b64": median("b64", "p50_ms"), "cpu_us": median("cpu_us")}
        ctx.progress(f"http: {name:<7} c=1 p50 {got['p50_c1']:.3f} ms; c=8 {got['rps_c8']:,.0f} req/s p99 "
                     f"{got['p99_c8']:.2f} ms {got['cpu_us']:.0f} µs CPU/request; b64 p50 {got['p50_b64']:.3f} ms")
    return results


def run(ctx: Context) -> None:
    workers = int(os.environ.get("BENCH_WORKERS", "1"))
    workdir = ctx.workdir / "http"
    workdir.mkdir(parents=True, exist_ok=True)
    data = model_bytes()
    model_path = workdir / "model.onnx"
    model_path.write_bytes(data)
    payloads = {1: body(1), 64: body(64)}
    bodies, scripts = {}, {}
    for batch, payload in payloads.items():
        bodies[batch] = workdir / f"body-{batch}.json"
        bodies[batch].write_bytes(payload)
        scripts[batch] = workdir / f"post-{batch}.lua"
        scripts[batch].write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                                  f"wrk.body = {json.dumps(payload.decode())}\n")

    core_ms = core_p50_ms(data, payloads[1], ctx.seconds(2, 0.2))
    generator = load_generator()
    ctx.progress(f"http: in-process core p50 {core_ms * 1000:.1f} µs; load generator {generator}; "
                 f"{workers} worker(s) per server")

    skipped: dict[str, str] = {}
    starters = {"floor": lambda: start_floor(model_path, workers, payloads[1], workdir)}
    for provider in hosts.PROVIDERS:
        starters[provider] = lambda p=provider: start_host(p, data, workers, payloads[1], workdir)
    peer = "BentoML"
    if ctx.smoke:
        skipped["bentoml"] = "BentoML skipped under --smoke (a separate install)"
    else:
        try:
            python = peer_venv(ctx)
            peer = f"BentoML {peer_version(python)}"
            starters["bentoml"] = lambda: start_peer(python, model_path, workers, payloads[1], workdir)
        except Exception as exc:  # noqa: BLE001 - the rest of the group still measures
            skipped["bentoml"] = f"BentoML not installed: {exc}"[:300]
    servers: list[Server] = []
    try:
        for start in starters.values():  # all up at once (idle, they cost next to nothing), measured in turn
            servers.append(start())
        results = measure(ctx, servers, generator, bodies, scripts)
    finally:
        for server in servers:
            server.stop()
    record(ctx, results, skipped, core_ms, workers, generator, peer, 1 if ctx.smoke else ROUNDS)


def record(ctx: Context, results: dict, skipped: dict, core_ms: float, workers: int, generator: str, peer: str,
           rounds: int) -> None:
    how = (f"{workers} worker{'s' if workers > 1 else ''} each, {generator}, "
           + (f"median of {rounds} rounds" if rounds > 1 else "1 round")
           + ("" if generator == "wrk" else " (no wrk: a Python client, slower than wrk)"))
    names = ["floor", *hosts.PROVIDERS, "bentoml"]

    def value(name: str, field: str) -> float | None:
        return results[name][field] if results.get(name) else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def add(key, unit, against, compute, goal=None, subjects=names):
        floor = compute("floor")
        for name in subjects:
            number = compute(name)
            goal_here = goal if name in hosts.PROVIDERS else None
            note = skipped.get(name) or (skipped.get("bentoml", "not measured") if number is None else "")
            if goal_here and Goal(*goal_here).met(number) is False:
                if Goal(*goal_here).met(floor) is False:  # the bare app misses it too: the machine, not the host
                    note = f"the floor misses it too here ({floor:.3g} {unit}): the machine's load, not the host"
                else:
                    note = f"limited by {LIMITS.get(name, 'the host')}"
            ctx.add(key, number, unit, f"{against}; {how}", subject=name, goal=goal_here, note=note)

    add("http_p50_overhead_ms", "ms", f"in-process core p50 ({core_ms * 1000:.1f} µs); c=1, batch 1",
        lambda n: None if value(n, "p50_c1") is None else value(n, "p50_c1") - core_ms, ("<=", 0.25))
    add("throughput_vs_peer", "x", f"{peer} req/s at c=8, batch 1",
        lambda n: ratio(value(n, "rps_c8"), value("bentoml", "rps_c8")), (">=", 5), names[:-1])
    add("http_p99_ms_c8", "ms", "c=8, batch 1", lambda n: value(n, "p99_c8"), ("<=", 5))
    add("http_b64_p50_ms", "ms", "c=1, batch 64", lambda n: value(n, "p50_b64"), ("<=", 1))
    add("cpu_per_request_vs_floor", "x", "the floor's CPU per request (c=8, batch 1)",
        lambda n: ratio(value(n, "cpu_us"), value("floor", "cpu_us")), ("<=", 2), names[1:])
    # the raw figures, side by side, no goals
    ctx.add("http_p50_ms_c1", core_ms, "ms", "the same model in process, no HTTP (api.predict, batch 1)",
            subject="in-process")
    add("http_p50_ms_c1", "ms", "c=1, batch 1", lambda n: value(n, "p50_c1"))
    add("http_rps_c8", "req/s", "c=8, batch 1", lambda n: value(n, "rps_c8"))
    add("http_p50_ms_c8", "ms", "c=8, batch 1", lambda n: value(n, "p50_c8"))
    add("http_cpu_us_per_request", "µs", "CPU of the server's process tree / requests (c=8)",
        lambda n: value(n, "cpu_us"))


if __name__ == "__main__" and sys.argv[1:2] == ["--load"]:  # the Python load generator's process
    url, payload_path, seconds, connections = sys.argv[2:6]
    print(json.dumps(python_client(url, Path(payload_path).read_bytes(), float(seconds), int(connections))))
