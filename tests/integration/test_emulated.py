"""The pipeline on real emulators: Kafka for the bus, LocalStack S3, fake-gcs-server and Azurite
for the three clouds' stores; afterwards the objects are in each emulator and every cloud's
endpoint serves the fused model, copied store to store by the deployers."""
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest

from skyfuse.dev import emulation
from skyfuse.storage import fetch, keys, open_store, sha256_of
from tests.conftest import KAFKA

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.kafka, pytest.mark.emulators]


def post(url, path, body, api_key=None):
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("POST", parts.path + path, body,
                 {"content-type": "application/json", **({"x-api-key": api_key} if api_key else {})})
    response = conn.getresponse()
    return response.status, orjson.loads(response.read())


def test_demo_on_the_emulators_places_objects_in_each_and_every_endpoint_serves(tmp_path, kafka_bootstrap):
    from skyfuse.dev.hosts import free_port
    from skyfuse.ml import data as mldata
    from skyfuse.ml import fusion

    env = {**os.environ, **emulation.ENVIRONMENT, "PYTHONPATH": str(REPO),
           "SKYFUSE_BUS__KAFKA__BOOTSTRAP_SERVERS": KAFKA,
           "SKYFUSE_TRAINING__EPOCHS": "30", "SKYFUSE_TRAINING__ROUNDS": "2", "SKYFUSE_TRAINING__TIMER_S": "0.5",
           **{f"SKYFUSE_CLOUDS__{c.upper()}__INFERENCE_PORT": str(free_port()) for c in ("aws", "gcp", "azure")}}
    skyfuse = [sys.executable, "-m", "skyfuse.cli"]
    up = subprocess.Popen([*skyfuse, "up", "--emulate", "--for", "240"], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, info = time.monotonic() + 60, {}
        while "gateways" not in info:  # up writes the endpoints, then the API gateway in front of aws
            assert up.poll() is None and time.monotonic() < deadline, (
                up.stdout.read() if up.poll() is not None else "up is slow")
            time.sleep(0.2)
            path = tmp_path / ".skyfuse" / "endpoints.json"
            info = json.loads(path.read_text()) if path.exists() else {}
        endpoints = info["clouds"]
        api_key = (tmp_path / ".skyfuse" / "keys" / "inference-api-key").read_text().strip()  # made by `up`
        run = subprocess.run([*skyfuse, "demo", "--emulate", "--json"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.loads(run.stdout.strip().splitlines()[-1])
        run_id, fused = summary["run_id"], summary["fused"]
        assert fused["model_uri"].startswith("s3://skyfuse-aws/")  # the fuser's control cloud is aws
        for name, value in emulation.ENVIRONMENT.items():  # so this process reads the emulated stores too
            os.environ.setdefault(name, value)
        for i, (cloud, store) in enumerate(emulation.STORES.items()):  # each shard in its own cloud's emulator
            assert open_store(store).exists(keys.shard(run_id, str(i))), (cloud, store)
            assert open_store(store).exists(keys.member_onnx(run_id, 0, cloud, str(i))), (cloud, store)
        # an operator places the model in all three clouds: each deployer copies it into its own emulator
        model = fetch(fused["model_uri"])
        placement = {"decision_id": f"manual-{run_id}", "decided_at": "2026-11-27T12:00:00Z",
                     "model_version": fused["version"], "model_uri": fused["model_uri"],
                     "sha256": sha256_of(model),
                     "source_cloud": "aws", "trigger": "manual",
                     "placements": [{"cloud": c, "weight": 0.34 if c == "aws" else 0.33, "replicas": 1}
                                    for c in endpoints],
                     "previous": [], "lambda": 1.0, "reason": "manual placement in every cloud",
                     "scores": [{"cloud": c, "cost": 1.0, "performance": 1.0, "total": 2.0, "eligible": True}
                                for c in endpoints],
                     "policy": {"margin": 0.15, "dwell_s": 900, "min_replicas": 1}}
        published = subprocess.run([*skyfuse, "publish", "placement.changed", "--data", json.dumps(placement),
                                    "--as", "aws/scheduler"],  # signed with the local control scheduler's key
                                   cwd=tmp_path, env={**env, "SKYFUSE_BUS__BACKEND": "kafka"},
                                   capture_output=True, text=True)
        assert published.returncode == 0, published.stderr
        test = mldata.split(mldata.sample_dataset("breast_cancer"), seed=0)[2]
        expected = [str(c) for c in (fusion.predict(model, test.X).argmax(1))]
        body = orjson.dumps({"instances": test.X.tolist(), "format": "compact"})
        for cloud, url in endpoints.items():
            deadline, answer = time.monotonic() + 60, None
            while time.monotonic() < deadline:
                answer = post(url, "/predict", body, api_key)
                if answer[0] == 200 and answer[1]["model_version"] == fused["version"]:
                    break
                time.sleep(0.5)
            assert answer[0] == 200 and answer[1]["model_version"] == fused["version"], (cloud, answer)
            assert [str(c) for c in answer[1]["predictions"]] == expected, cloud
            assert open_store(emulation.STORES[cloud]).exists(f"serving/models/{fused['version']}.onnx"), cloud
        # and the AWS function as a user calls it in AWS: through API Gateway (LocalStack's)
        gateway = info["gateways"]["aws"]
        status, doc = post(gateway, "/predict", body)
        # the local fleet runs with API keys
        assert status == 401 and doc["detail"]["code"] == "unauthorized", (status, doc)
        status, doc = post(gateway, "/predict", body, api_key)
        assert status == 200 and doc["model_version"] == fused["version"], (status, doc)
        assert [str(c) for c in doc["predictions"]] == expected
        status, doc = post(gateway, "/predict", b'{"instances": [[1, 2]]}', api_key)
        assert status == 400 and "expected 30" in doc["error"]  # the function's own 4xx, through the gateway
    finally:
        up.terminate()
        up.wait(60)
