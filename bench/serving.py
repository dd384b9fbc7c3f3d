"""Serving benchmark: each cloud's inference host on 127.0.0.1, POST /predict at batch 1.

    .venv/bin/python bench/serving.py [--duration 5] [--connections 4] [--batch 1] [--client wrk|python]

Serves a small MLP (30 features → 32 → 16 → 2 classes) from a temporary store, starts each host
with `skyfuse.serving.hosts` (the same servers the tests use), warms it up, then measures
requests/s and latency percentiles over persistent connections: with `wrk` when it is installed
(`apt-get install -y wrk`), else a Python client (one thread and one keep-alive connection per
connection; it shares the CPUs with the server, so it measures lower). Prints a table, and the
in-process cost of the core (parse + predict + serialize) for reference.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "shared")]

from skyfuse.serving import api, hosts, testing  # noqa: E402
from skyfuse.serving.model import LoadedModel, ModelSlot, publish  # noqa: E402
from skyfuse.storage import open_store  # noqa: E402

SERVERS = {"aws": "uvicorn + Powertools HttpResolverLocal", "gcp": "functions-framework (gunicorn gthread)",
           "azure": "uvicorn + Azure Functions HTTP adapter"}
WIDTH = 30


def model_bytes() -> bytes:
    return testing.classifier(width=WIDTH, classes=("malignant", "benign"), hidden=(32, 16), seed=0)


def body(batch: int) -> bytes:
    rows = np.random.default_rng(0).normal(size=(batch, WIDTH)).round(4)
    return orjson.dumps({"instances": rows.tolist()})


def in_process(data: bytes, payload: bytes, seconds: float = 1.0) -> float:
    """µs per request of the core alone."""
    slot = ModelSlot()
    slot.swap(LoadedModel(data, "bench"))
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(200):
            api.predict(payload, slot)
        n += 200
    return (time.perf_counter() - started) / n * 1e6


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(url: str, payload: bytes, duration: float, connections: int, workdir: Path) -> dict:
    script = workdir / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = {json.dumps(payload.decode())}\n")
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, timeout=duration + 30)
    if out.returncode != 0 or "Requests/sec" not in out.stdout:
        raise RuntimeError(f"wrk failed on {url}: {out.stdout}{out.stderr}")
    out = out.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return {"requests": total, "rps": rps, "p50_ms": _ms(pct["50"]), "p99_ms": _ms(pct["99"]),
            "non_2xx": int(bad.group(1)) if bad else 0, "socket_errors": errors.group(1) if errors else ""}


def run_python(url: str, payload: bytes, duration: float, connections: int) -> dict:
    port, path = int(url.split(":")[2].split("/")[0]), "/" + url.split("/", 3)[3]
    latencies: list[list[float]] = [[] for _ in range(connections)]
    bad = [0] * connections
    stop_at = time.perf_counter() + duration

    def client(k: int):
        conn = http.client.HTTPConnection("127.0.0.1", port)
        headers = {"Content-Type": "application/json"}
        while (start := time.perf_counter()) < stop_at:
            conn.request("POST", path, payload, headers)
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
    elapsed = time.perf_counter() - started
    lat = np.concatenate([np.array(x) for x in latencies]) * 1000
    return {"requests": len(lat), "rps": len(lat) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "non_2xx": sum(bad), "socket_errors": ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--client", choices=("wrk", "python"), default="wrk" if shutil.which("wrk") else "python")
    parser.add_argument("--providers", default=",".join(hosts.PROVIDERS))
    parser.add_argument("--json", dest="json_out", help="also write the results here")
    args = parser.parse_args(argv)

    data, payload = model_bytes(), body(args.batch)
    core_us = in_process(data, payload)
    results = []
    with tempfile.TemporaryDirectory(prefix="skyfuse-bench-") as tmp:
        root = Path(tmp)
        (root / "skyfuse.toml").write_text("")
        for provider in args.providers.split(","):
            store_uri = f"file://{root}/{provider}"
            publish(open_store(store_uri), "bench-v1", data)
            env = {"SKYFUSE_CONFIG": str(root / "skyfuse.toml"), "SKYFUSE_CLOUD": provider,
                   f"SKYFUSE_CLOUDS__{provider.upper()}__STORE": store_uri,
                   "SKYFUSE_BUS__EMBEDDED__PATH": str(root / "bus"), "INFERENCE_METRICS_S": "30"}
            # every host gets the same number of server processes (uvicorn --workers, gunicorn's WORKERS)
            host = hosts.start(provider, env=env, log_dir=root, workers=int(os.environ.get("WORKERS", "1")))
            try:
                url = f"{host.url}/predict"
                warm = (run_wrk(url, payload, 1, args.connections, root) if args.client == "wrk"
                        else run_python(url, payload, 1, args.connections))
                assert warm["non_2xx"] == 0, f"{provider}: warm-up got non-2xx answers"
                r = (run_wrk(url, payload, args.duration, args.connections, root) if args.client == "wrk"
                     else run_python(url, payload, args.duration, args.connections))
            finally:
                host.stop()
            results.append({"cloud": provider, "server": SERVERS[provider], **r})

    print(f"\nPOST /predict, batch {args.batch}, {WIDTH}-feature MLP, {args.connections} keep-alive connections, "
          f"{args.duration:g} s each, client {args.client}, {os.cpu_count()} CPUs; "
          f"in-process core: {core_us:.1f} µs/request")
    print(f"{'cloud':<6} {'server':<42} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'requests':>9} {'non-2xx':>8}")
    for r in results:
        errors = f"  socket errors: {r['socket_errors']}" if r["socket_errors"] else ""
        print(f"{r['cloud']:<6} {r['server']:<42} {r['rps']:>8.0f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} "
              f"{r['requests']:>9} {r['non_2xx']:>8}{errors}")
    if args.json_out:
        doc = {"core_us": core_us, "args": vars(args), "results": results}
        Path(args.json_out).write_text(json.dumps(doc, indent=2))
    return 1 if any(r["non_2xx"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
