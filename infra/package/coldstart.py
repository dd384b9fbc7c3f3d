"""Cold start of the inference entry points: import time and process start to first prediction.

    .venv/bin/python infra/package/coldstart.py                       # this checkout, every cloud
    .venv/bin/python infra/package/coldstart.py --python /tmp/v/bin/python --installed --runs 3

For each cloud's inference server (the command lines of `skyfuse.dev.hosts`: uvicorn for aws
and azure, functions-framework's gunicorn for gcp) it reports

- import: `python -X importtime -c "import <entry point>"`, the cumulative time of the entry
  module(s) (median of `--runs`);
- first prediction: from starting the server process to the first 200 answer of POST /predict,
  with a model already published in a file store (median of `--runs`; each run a fresh process).

`--python` picks the interpreter that runs the servers (default: this one). Without `--installed`
the checkout is put on PYTHONPATH (what `skyfuse.dev.hosts` does); with it, the interpreter
must have skyfuse and services installed (a wheel), and nothing of the checkout is on its path.
The servers run in a temporary folder, never in the checkout. The model is built here with
`skyfuse.serving.testing.classifier` (onnx), or read from `--model FILE.onnx`.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROVIDERS = ("aws", "gcp", "azure")
ENTRY = {"aws": ["services.inference.aws"], "gcp": ["services.inference.gcp"],
         "azure": ["services.inference.azure_host", "services.inference.azure"]}
BASE = {"aws": "", "gcp": "", "azure": "/api"}
BODY = json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]}).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(provider: str, root: Path, installed: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYFUSE_", "INFERENCE_", "PYTHON"))}
    (root / "skyfuse.toml").write_text("")
    env.update({"SKYFUSE_CONFIG": str(root / "skyfuse.toml"), "SKYFUSE_CLOUD": provider,
                f"SKYFUSE_CLOUDS__{provider.upper()}__STORE": f"file://{root}/store",
                "SKYFUSE_BUS__BACKEND": "embedded", "SKYFUSE_BUS__EMBEDDED__PATH": str(root / "bus"),
                "INFERENCE_METRICS_S": "0", "WORKERS": "1", "PYTHONUNBUFFERED": "1",
                "XDG_RUNTIME_DIR": str(root)})  # gunicorn's control socket
    if not installed:
        env["PYTHONPATH"] = os.pathsep.join((str(REPO), str(REPO / "shared")))
    return env


def gcp_source(python: str, env: dict[str, str], cwd: Path) -> str:
    """Where the interpreter finds services/inference/gcp.py (without importing it)."""
    code = "import importlib.util as u; print(u.find_spec('services.inference.gcp').origin)"
    return subprocess.run([python, "-c", code], env=env, cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def command(provider: str, python: str, port: int, env: dict[str, str], cwd: Path) -> list[str]:
    uvicorn = ["--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
               "--lifespan", "on", "--no-access-log", "--log-level", "warning"]
    if provider == "aws":
        return [python, "-m", "uvicorn", "services.inference.aws:asgi", *uvicorn]
    if provider == "azure":
        return [python, "-m", "uvicorn", "services.inference.azure_host:create_app", "--factory", *uvicorn]
    return [python, "-m", "functions_framework", "--target", "inference", "--source", gcp_source(python, env, cwd),
            "--signature-type", "http", "--host", "127.0.0.1", "--port", str(port)]


def import_ms(provider: str, python: str, env: dict[str, str], cwd: Path) -> float:
    """Cumulative import time (ms) of the provider's entry module(s), from -X importtime."""
    modules = ENTRY[provider]
    out = subprocess.run([python, "-X", "importtime", "-c", "import " + ", ".join(modules)], env=env, cwd=cwd,
                         capture_output=True, text=True, check=True).stderr
    total = 0
    for line in out.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S+)$", line)  # top level: no indent
        if m and m.group(2) in modules:
            total += int(m.group(1))
    return total / 1000


def predict(port: int, base: str) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", base + "/predict", body=BODY, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        if response.status == 200 and b"predictions" not in payload:
            raise RuntimeError(f"200 without predictions: {payload[:200]!r}")
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


def start(provider: str, python: str, env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen, int, Path]:
    """(process, port, log) of `provider`'s inference server, started in its own process group."""
    port = free_port()
    argv = command(provider, python, port, env, cwd)
    log = cwd / f"{provider}-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return process, port, log


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 5 s, and to whatever it left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(5)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(process.pid, signal.SIGKILL)  # workers the leader left behind
    except ProcessLookupError:
        pass


def wait_for_prediction(provider: str, process: subprocess.Popen, port: int, log: Path, started: float,
                        timeout_s: float = 60) -> float:
    """Seconds from `started` (perf_counter) to the server's first 200 on POST /predict."""
    while True:
        if predict(port, BASE[provider]) == 200:
            return time.perf_counter() - started
        if process.poll() is not None:
            raise RuntimeError(f"{provider} server exited with {process.returncode}: {log.read_text()[-3000:]}")
        if time.perf_counter() - started > timeout_s:
            raise RuntimeError(f"{provider}: no prediction within {timeout_s} s: {log.read_text()[-3000:]}")
        time.sleep(0.01)


def first_prediction_s(provider: str, python: str, env: dict[str, str], cwd: Path, timeout_s: float = 60) -> float:
    """Seconds from starting the server process to its first 200 on POST /predict."""
    started = time.perf_counter()
    process, port, log = start(provider, python, env, cwd)
    try:
        return wait_for_prediction(provider, process, port, log, started, timeout_s)
    finally:
        stop(process)


def model_bytes(path: str | None) -> bytes:
    if path:
        return Path(path).read_bytes()
    from skyfuse.serving.testing import classifier

    return classifier(seed=1)


def measure(python: str, installed: bool, providers, runs: int, model: bytes) -> dict[str, dict[str, float]]:
    from skyfuse.serving.model import publish
    from skyfuse.storage import open_store

    results = {}
    with tempfile.TemporaryDirectory(prefix="skyfuse-coldstart-") as tmp:
        for provider in providers:
            root = Path(tmp) / provider
            root.mkdir()
            env = child_env(provider, root, installed)
            publish(open_store(f"file://{root}/store"), "v1", model)
            imports = [import_ms(provider, python, env, root) for _ in range(runs)]
            firsts = [first_prediction_s(provider, python, env, root) for _ in range(runs)]
            results[provider] = {"import_ms": statistics.median(imports),
                                 "first_prediction_s": statistics.median(firsts),
                                 "first_prediction_min_s": min(firsts)}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the servers")
    parser.add_argument("--installed", action="store_true", help="skyfuse is installed there: no checkout on the path")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", help="an ONNX classifier (4 inputs) instead of building one with onnx")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if str(REPO / "shared") not in sys.path:
        sys.path.insert(0, str(REPO / "shared"))
    results = measure(args.python, args.installed, args.providers, args.runs, model_bytes(args.model))
    print(f"{'cloud':<6} {'import (ms)':>12} {'start → first prediction (s)':>30}   (median of {args.runs}; min)")
    for provider, r in results.items():
        first, fastest = r["first_prediction_s"], r["first_prediction_min_s"]
        print(f"{provider:<6} {r['import_ms']:>12.0f} {first:>24.2f} ({fastest:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
