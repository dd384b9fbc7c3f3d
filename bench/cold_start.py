"""Cold start: process start (Popen) to the first 200 on POST /predict, per host, against TensorFlow.

Each cloud's host is started as `skyfuse.dev.hosts.command` starts it, with the bench's MLP
already published in its store; the clock runs from Popen until a POST /predict (retried on a
refused connection every 2 ms) answers 200. The reference is the same function serving the same
MLP as a Keras model with TensorFlow (`bench/tf_function.py`, stdlib http.server); the floor (the
bare ASGI app of `bench/floor_app.py` under uvicorn: Python, uvicorn, numpy, onnxruntime and the
model, nothing else) is recorded for context. Starts go round-robin over the servers, so a busy
moment of the machine does not fall on one of them only; each figure is the best of its starts
(other work on the machine only ever adds to a start), with the median and the CPU seconds the
server's processes used until the answer (which other work does not inflate) in its note.
"""
from __future__ import annotations

import compileall
import http.client
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import orjson

import harness
from skyfuse.dev import hosts
from skyfuse.serving import testing
from skyfuse.serving.model import publish
from skyfuse.storage import open_store

TF_SCRIPT = harness.BENCH / "tf_function.py"
FLOOR_APP = harness.BENCH / "floor_app.py"
WIDTH = 30  # the bench's MLP: 30 features → 32 → 16 → 2 classes
TF_AGAINST = "TensorFlow/Keras serving the same MLP (bench/tf_function.py, http.server), best start each"
START_GOAL = ("<=", 0.3)
# What a start spends, from -X importtime and phase marks on this kind of machine; shown beside a
# miss. Every host imports numpy and onnxruntime; the fleet config (msgspec) takes a few ms.
LIMITS = {
    "gcp": "functions-framework, which imports Flask (with Werkzeug and Jinja) even in its ASGI mode "
           "(about 0.1 s), then gunicorn, which forks the uvicorn worker that loads onnxruntime and "
           "the model: about 50 ms more than a uvicorn host",
}


def model_bytes() -> bytes:
    return testing.classifier(width=WIDTH, classes=("malignant", "benign"), hidden=(32, 16), seed=0)


def first_answer(process: subprocess.Popen, port: int, path: str, payload: bytes, timeout_s: float = 120.0) -> float:
    """Wait for the first 200 on POST `path`; the perf_counter time it came back."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before answering POST {path}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        try:
            conn.request("POST", path, payload, {"Content-Type": "application/json"})
            response = conn.getresponse()
            body = response.read()
        except ConnectionError:  # not listening yet (refused), or gone while starting
            time.sleep(0.002)
            continue
        finally:
            conn.close()
        if response.status == 200:
            return time.perf_counter()
        if response.status != 503:  # 503: up, model not loaded yet
            raise RuntimeError(f"POST {path} answered {response.status}: {body[:300]!r}")
        time.sleep(0.002)
    raise RuntimeError(f"no 200 on POST {path} within {timeout_s:.0f} s")


def group_cpu_s(pgid: int) -> float | None:
    """CPU seconds (user + system) the live processes of group `pgid` have used; None off Linux. Unlike
    the wall clock, it does not grow when other work on the machine takes the cores."""
    if not os.path.isdir("/proc"):
        return None
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces
        if int(fields[2]) == pgid:  # fields: state, ppid, pgrp, …, utime (11), stime (12)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def timed_start(argv: list[str], env: dict, port: int, path: str, payload: bytes,
                log: Path) -> tuple[float, float | None]:
    """(seconds from Popen to the first 200, CPU seconds the server used until then); the server is
    stopped (its process group) afterwards."""
    with open(log, "ab") as log_file:
        started = time.perf_counter()
        process = subprocess.Popen(argv, cwd=harness.REPO, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    server = hosts.Host("bench", port, "", process, log)
    try:
        answered = first_answer(process, port, path, payload) - started
        return answered, group_cpu_s(process.pid)
    except RuntimeError as exc:
        raise RuntimeError(f"{' '.join(argv)}: {exc}\n{log.read_text(errors='replace')[-3000:]}") from None
    finally:
        server.stop()


def host_launch(provider: str, root: Path) -> tuple[list[str], dict, int, str]:
    """(argv, environment, port, predict path) of one start, as `hosts.start` runs the host."""
    port = hosts.free_port()
    store_uri = f"file://{root}/{provider}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SKYFUSE_CONFIG": str(root / "skyfuse.toml"),
           "SKYFUSE_CLOUD": provider,
           f"SKYFUSE_CLOUDS__{provider.upper()}__STORE": store_uri,
           "SKYFUSE_BUS__EMBEDDED__PATH": str(root / "bus"), "INFERENCE_METRICS_S": "30",
           "PYTHONPATH": os.pathsep.join([str(harness.REPO), str(harness.REPO / "shared")])}
    if provider == "gcp":  # as hosts.start: no Flask debug server; gunicorn's control socket in a folder of ours
        env.pop("DEBUG", None)
        env["XDG_RUNTIME_DIR"] = str(root)
    return hosts.command(provider, port), env, port, f"{hosts.BASE_PATH[provider]}/predict"


def floor_launch(root: Path) -> tuple[list[str], dict, int, str]:
    """The bare ASGI app under uvicorn with the hosts' options: what no Python server can start without."""
    port = hosts.free_port()
    argv = [sys.executable, "-m", "uvicorn", "floor_app:app", "--app-dir", str(harness.BENCH), "--host", "127.0.0.1",
            "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--ws", "none", "--lifespan", "off",
            "--no-access-log", "--log-level", "warning"]
    return argv, {**os.environ, "FLOOR_MODEL": str(root / "model.onnx")}, port, "/predict"


def tf_launch(model: Path) -> tuple[list[str], dict, int, str]:
    port = hosts.free_port()
    return ([sys.executable, str(TF_SCRIPT), "serve", str(model), "--port", str(port)],
            {**os.environ, "CUDA_VISIBLE_DEVICES": ""}, port, "/predict")


def run(ctx: harness.Context) -> None:
    root = ctx.workdir / "cold"
    root.mkdir(parents=True, exist_ok=True)
    (root / "skyfuse.toml").write_text("")
    data, payload = model_bytes(), orjson.dumps({"instances": [[0.5] * WIDTH]})
    for provider in hosts.PROVIDERS:
        publish(open_store(f"file://{root}/{provider}"), "bench-v1", data)
    (root / "model.onnx").write_bytes(data)
    # bytecode up to date, as a deployed package has it: no start compiles a source, even where
    # PYTHONDONTWRITEBYTECODE keeps the servers from writing what they compile
    for folder in (harness.REPO / "services", harness.REPO / "shared" / "skyfuse"):
        compileall.compile_dir(folder, quiet=1)
    if FLOOR_APP.exists():
        compileall.compile_file(FLOOR_APP, quiet=1)

    starts, tf_starts = int(ctx.seconds(7, 1)), int(ctx.seconds(3, 0))
    servers = {p: (lambda p=p: host_launch(p, root)) for p in hosts.PROVIDERS}
    if FLOOR_APP.exists():
        servers["floor"] = lambda: floor_launch(root)
    tf_note = "skipped under --smoke (a TensorFlow start takes seconds)"
    if tf_starts:
        model = root / "mlp.keras"
        subprocess.run([sys.executable, str(TF_SCRIPT), "save", str(model)], check=True, capture_output=True,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
        servers["tensorflow"] = lambda: tf_launch(model)

    wall: dict[str, list[float]] = {name: [] for name in servers}
    cpu: dict[str, list[float]] = {name: [] for name in servers}
    for i in range(starts):  # round-robin: a busy moment of the machine is shared out
        for name, launch in servers.items():
            if name == "tensorflow" and i >= tf_starts:
                continue
            argv, env, port, path = launch()
            seconds, used = timed_start(argv, env, port, path, payload, root / f"{name}.log")
            wall[name].append(seconds)
            cpu[name] += [used] if used is not None else []
            ctx.progress(f"cold: {name} start {i + 1}: {seconds:.3f} s" + (f", {used:.2f} CPU s" if used else ""))

    def best(name: str) -> float | None:
        """The fastest start: other work on the machine only ever adds to a start's time."""
        return min(wall[name]) if wall.get(name) else None

    def how(name: str) -> str:
        n = len(wall[name])
        spread = f"best of {n} starts, median {statistics.median(wall[name]):.3f} s" if n > 1 else "one start"
        return spread + (f"; {statistics.median(cpu[name]):.2f} CPU s to the answer" if cpu[name] else "")

    tf, floor = best("tensorflow"), best("floor")
    for provider in hosts.PROVIDERS:
        value = best(provider)
        missed = harness.Goal(*START_GOAL).met(value) is False
        ctx.add("cold_start_s", value, "s", "process start → first 200 on POST /predict, model in the store",
                subject=provider, goal=START_GOAL, note=how(provider) + (f"; floor {floor:.3f} s" if floor else "")
                + (f"; limited by {LIMITS[provider]}" if missed and provider in LIMITS else ""))
        ctx.add("cold_start_vs_tf", value / tf if tf else None, "×", TF_AGAINST, subject=provider,
                goal=("<=", 0.1), note=f"TensorFlow {how('tensorflow')}" if tf else tf_note)
    ctx.add("cold_start_tf_s", tf, "s", "context: the reference's own cold start", subject="tensorflow",
            note=how("tensorflow") if tf else tf_note)
    ctx.add("cold_start_floor_s", floor, "s",
            "context: bare ASGI app on uvicorn (bench/floor_app.py), same model and server options",
            subject="floor", note=how("floor") if floor else "bench/floor_app.py is missing")
