"""Run each built inference artifact the way its cloud would, without Docker or a cloud account, and
check that it answers a prediction equal to onnxruntime's for a model published in a file store.

    .venv/bin/python infra/package/check.py [build/package] [--clouds aws gcp azure] [--runs 3]

- aws: a fresh Python 3.12 process (`-S`: none of this machine's site-packages) with only the
  function code and the layer's python/ on its path (/var/task, /opt/python), the template's
  environment (SKYFUSE_EVENTS_DIR=<layer>/events; AWS_LAMBDA_FUNCTION_NAME set, so the model loads
  during init; no .pyc written: /opt is read-only), then `services/inference/aws.lambda_handler`
  with a Function URL event (payload 2.0) for POST /predict. Reports init (imports + model) and
  first-invoke times. Not Lambda's own runtime (Amazon Linux 2023, its bootstrap): the same
  Python minor version, the same files on the path, the same handler call.
- gcp: the source folder copied as /workspace would be, its requirements.txt pip-installed into a
  fresh Python 3.12 venv (what the buildpack does; needs the package index), then
  functions-framework --target inference --source main.py; time from process start to the first
  200 of POST /predict.
- azure: a fresh Python 3.11 process (`-S`) with the app folder and its .python_packages on its
  path, as the Functions host puts them; imports function_app, calls its `predict` function with
  an `azure.functions.HttpRequest`.

Each needs an interpreter of its cloud's Python version (on PATH as python3.X, or pyenv's); a cloud
without one is reported as not checked.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "shared"))
from build import AWS_PYTHON, AZURE_PYTHON, GCP_PYTHON, find_python  # noqa: E402

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
# what no inference artifact may import: training, the CLI, the slow format checker, other clouds
UNWANTED = ("tensorflow", "onnx", "typer", "rich", "rfc3987_syntax", "lark")
OTHER_CLOUDS = {"aws": ("google", "azure", "uvicorn"), "gcp": ("aws_lambda_powertools", "boto3", "azure"),
                "azure": ("aws_lambda_powertools", "boto3", "botocore", "google", "uvicorn")}

AWS_CHILD = r'''
import json, sys, time
t0 = time.perf_counter()
layer, function, body, unwanted = sys.argv[1], sys.argv[2], sys.argv[3], tuple(json.loads(sys.argv[4]))
sys.path[:0] = [function, layer + "/python"]            # /var/task, then /opt/python
import services.inference.aws as entry                   # init: imports, and the model (AWS_LAMBDA_FUNCTION_NAME)
t1 = time.perf_counter()
event = {"version": "2.0", "routeKey": "$default", "rawPath": "/predict", "rawQueryString": "",
         "headers": {"content-type": "application/json", "host": "x.lambda-url.us-east-1.on.aws"},
         "requestContext": {"accountId": "anonymous", "apiId": "x", "domainName": "x.lambda-url.us-east-1.on.aws",
                            "domainPrefix": "x", "requestId": "r-1", "routeKey": "$default", "stage": "$default",
                            "time": "01/Jan/2026:00:00:00 +0000", "timeEpoch": 0,
                            "http": {"method": "POST", "path": "/predict", "protocol": "HTTP/1.1",
                                     "sourceIp": "127.0.0.1", "userAgent": "check"}},
         "body": body, "isBase64Encoded": False}
class Context:
    function_name = "skyfuse-inference"; function_version = "$LATEST"; memory_limit_in_mb = 2048
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:skyfuse-inference"
    aws_request_id = "r-1"; log_group_name = "/aws/lambda/skyfuse-inference"; log_stream_name = "local"
    def get_remaining_time_in_millis(self): return 30000
answer = entry.lambda_handler(event, Context())
t2 = time.perf_counter()
print(json.dumps({"init_s": t1 - t0, "invoke_s": t2 - t1, "status": answer["statusCode"], "body": answer["body"],
                  "unwanted": sorted(m for m in sys.modules if m.split(".")[0] in unwanted),
                  "python": sys.version.split()[0]}))
'''

AZURE_CHILD = r'''
import json, sys, time
t0 = time.perf_counter()
app, body, unwanted = sys.argv[1], sys.argv[2], tuple(json.loads(sys.argv[3]))
sys.path[:0] = [app, app + "/.python_packages/lib/site-packages"]
import function_app, azure.functions as func
t1 = time.perf_counter()
functions = {f.get_function_name(): f.get_user_function() for f in function_app.app.get_functions()}
request = func.HttpRequest(method="POST", url="http://localhost/api/predict",
                           headers={"Content-Type": "application/json"}, params={}, route_params={},
                           body=body.encode())
answer = functions["predict"](request)
t2 = time.perf_counter()
print(json.dumps({"init_s": t1 - t0, "invoke_s": t2 - t1, "status": answer.status_code,
                  "body": answer.get_body().decode(), "functions": sorted(functions),
                  "unwanted": sorted(m for m in sys.modules if m.split(".")[0] in unwanted),
                  "python": sys.version.split()[0]}))
'''


def _published(root: Path, seed: int = 2) -> bytes:
    from skyfuse.serving import testing
    from skyfuse.serving.model import publish
    from skyfuse.storage import open_store

    model = testing.classifier(seed=seed)
    publish(open_store(f"file://{root}/store"), "v1", model)
    return model


def _check_answer(cloud: str, status: int, body: str | bytes, model: bytes) -> None:
    import numpy as np

    from skyfuse.serving import testing

    doc = json.loads(body)
    if status != 200 or doc.get("model_version") != "v1" or len(doc.get("predictions", ())) != len(ROWS):
        raise RuntimeError(f"{cloud}: unexpected answer {status}: {str(body)[:500]}")
    got = np.array([list(p["probabilities"].values()) for p in doc["predictions"]], dtype=np.float32)
    np.testing.assert_allclose(got, testing.reference(model, ROWS), rtol=1e-5, atol=1e-6)


def _env(root: Path, cloud: str, **extra: str) -> dict[str, str]:
    (root / "skyfuse.toml").write_text("")
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root), "LANG": "C.UTF-8",
            "SKYFUSE_CLOUD": cloud, "SKYFUSE_FUNCTION": "inference", "SKYFUSE_CONFIG": str(root / "skyfuse.toml"),
            f"SKYFUSE_CLOUDS__{cloud.upper()}__STORE": f"file://{root}/store", "SKYFUSE_BUS__BACKEND": "embedded",
            "SKYFUSE_BUS__EMBEDDED__PATH": str(root / "bus"), "INFERENCE_METRICS_S": "0", **extra}


def _run_child(cloud: str, argv: list[str], cwd: Path, env: dict[str, str]) -> dict:
    started, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"{cloud}: the entry point failed:\n{out.stderr[-4000:]}")
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    doc["process_s"] = wall
    doc["cpu_s"] = after.ru_utime - cpu.ru_utime + after.ru_stime - cpu.ru_stime
    if doc["unwanted"]:
        raise RuntimeError(f"{cloud}: the inference artifact imported {doc['unwanted']}")
    return doc


def _medians(cloud: str, results: list[dict]) -> dict:
    keys = ("init_s", "invoke_s", "process_s", "cpu_s")
    return {"cloud": cloud, "python": results[-1]["python"], "runs": len(results),
            **{k: statistics.median(r[k] for r in results) for k in keys if k in results[-1]}}


def check_aws(build: Path, python: str, runs: int = 3) -> dict:
    """`build`: sam build's folder (SkyfuseLayer/, InferenceFunction/)."""
    layer, function = build / "SkyfuseLayer", build / "InferenceFunction"
    with tempfile.TemporaryDirectory(prefix="skyfuse-check-aws-") as tmp:
        root = Path(tmp)
        model = _published(root)
        env = _env(root, "aws", AWS_LAMBDA_FUNCTION_NAME="skyfuse-inference", AWS_REGION="us-east-1",
                   SKYFUSE_EVENTS_DIR=str(layer / "events"), SKYFUSE_SIGNING__KEYS_DIR=str(layer / "keys"),
                   OMP_NUM_THREADS="1", POWERTOOLS_LOG_LEVEL="WARNING", PYTHONDONTWRITEBYTECODE="1")
        unwanted = json.dumps(UNWANTED + OTHER_CLOUDS["aws"])
        argv = [python, "-S", "-c", AWS_CHILD, str(layer), str(function), json.dumps({"instances": ROWS}), unwanted]
        results = [_run_child("aws", argv, root, env) for _ in range(runs)]
    _check_answer("aws", results[-1]["status"], results[-1]["body"], model)
    return _medians("aws", results)


def check_azure(folder: Path, python: str, runs: int = 3) -> dict:
    """`folder`: the function app folder (function_app.py, .python_packages)."""
    with tempfile.TemporaryDirectory(prefix="skyfuse-check-azure-") as tmp:
        root = Path(tmp)
        model = _published(root)
        app = root / "wwwroot"
        shutil.copytree(folder, app)
        env = _env(root, "azure", SKYFUSE_EVENTS_DIR=str(app / "events"), SKYFUSE_SIGNING__KEYS_DIR=str(app / "keys"),
                   PYTHONDONTWRITEBYTECODE="1")
        unwanted = json.dumps(UNWANTED + OTHER_CLOUDS["azure"])
        argv = [python, "-S", "-c", AZURE_CHILD, str(app), json.dumps({"instances": ROWS}), unwanted]
        results = [_run_child("azure", argv, root, env) for _ in range(runs)]
    _check_answer("azure", results[-1]["status"], results[-1]["body"], model)
    if "predict" not in results[-1]["functions"]:
        raise RuntimeError(f"azure: no predict function in {results[-1]['functions']}")
    return _medians("azure", results)


def check_gcp(folder: Path, python: str, runs: int = 3) -> dict:
    """`folder`: the source folder (main.py, requirements.txt); pip-installs requirements.txt."""
    import coldstart

    with tempfile.TemporaryDirectory(prefix="skyfuse-check-gcp-") as tmp:
        root = Path(tmp)
        model = _published(root)
        workspace = root / "workspace"
        shutil.copytree(folder, workspace)
        subprocess.run([python, "-m", "venv", root / "venv"], check=True)
        venv_python = str(root / "venv" / "bin" / "python")
        install = subprocess.run([venv_python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r",
                                  "requirements.txt"], cwd=workspace, capture_output=True, text=True, timeout=600)
        if install.returncode != 0:
            raise RuntimeError(f"gcp: pip install -r requirements.txt failed:\n{install.stderr[-3000:]}")
        env = _env(root, "gcp", SKYFUSE_EVENTS_DIR=str(workspace / "events"),
                   SKYFUSE_SIGNING__KEYS_DIR=str(workspace / ".skyfuse" / "keys"), WORKERS="1",
                   XDG_RUNTIME_DIR=str(root))
        results = []
        for _ in range(runs):
            port = coldstart.free_port()
            log = root / f"gcp-{port}.log"
            started = time.perf_counter()
            with open(log, "wb") as out:
                process = subprocess.Popen(
                    [venv_python, "-m", "functions_framework", "--target", "inference", "--source", "main.py",
                     "--signature-type", "http", "--host", "127.0.0.1", "--port", str(port)],
                    cwd=workspace, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True)
            try:
                first = coldstart.wait_for_prediction("gcp", process, port, log, started)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("POST", "/predict", body=json.dumps({"instances": ROWS}),
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                status, body = response.status, response.read()
                conn.close()
            finally:
                coldstart.stop(process)
            results.append({"process_s": first, "python": "", "status": status, "body": body})
        version = subprocess.run([venv_python, "-c", "import sys; print(sys.version.split()[0])"],
                                 capture_output=True, text=True).stdout.strip()
    _check_answer("gcp", results[-1]["status"], results[-1]["body"], model)
    results[-1]["python"] = version
    return _medians("gcp", results)


def describe(r: dict) -> str:
    parts = [f"python {r['python']}"]
    if "init_s" in r:
        parts.append(f"init (imports + model) {r['init_s'] * 1000:.0f} ms, first call {r['invoke_s'] * 1000:.0f} ms")
    if "cpu_s" in r:
        parts.append(f"process start to answer {r['process_s']:.2f} s ({r['cpu_s']:.2f} s CPU)")
    else:
        parts.append(f"process start to first prediction {r['process_s']:.2f} s")
    return f"{r['cloud']}: " + ", ".join(parts) + f"; prediction checked (median of {r['runs']})"


CHECKS = {"aws": (AWS_PYTHON, lambda out: out / "aws" / "sam", check_aws),
          "gcp": (GCP_PYTHON, lambda out: out / "gcp" / "inference", check_gcp),
          "azure": (AZURE_PYTHON, lambda out: out / "azure" / "inference", check_azure)}


def run_checks(out: Path, clouds, runs: int = 3) -> list[str]:
    lines = []
    for cloud in clouds:
        version, where, check = CHECKS[cloud]
        path = where(out)
        if cloud == "aws" and not path.is_dir():
            path = out / "aws" / "build"  # built without SAM CLI
        python = find_python(version)
        if python is None:
            lines.append(f"{cloud}: not checked: no Python {version} here")
            continue
        lines.append(describe(check(path, python, runs)))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default=str(REPO / "build" / "package"))
    parser.add_argument("--clouds", nargs="+", choices=tuple(CHECKS), default=list(CHECKS))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    for line in run_checks(Path(args.out).resolve(), args.clouds, args.runs):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
