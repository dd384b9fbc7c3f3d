"""The `skyfuse` command as a user runs it, on both buses."""
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from skyfuse import config, contracts
from skyfuse.cli.publish import sample_producer
from tests.conftest import fleet_env

SKYFUSE = [sys.executable, "-m", "skyfuse.cli"]


def cli(env, *args, timeout=120):
    return subprocess.run([*SKYFUSE, *args], env={**os.environ, **env, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=timeout)


def cli_json(env, *args):
    """What a `--json` command printed; a command that failed fails the test with its stderr."""
    run = cli(env, *args)
    assert run.returncode == 0, f"skyfuse {' '.join(args)} exited with {run.returncode}:\n{run.stderr}"
    return json.loads(run.stdout)


@pytest.fixture
def env(backend, tmp_path, monkeypatch):
    """The fleet's environment; the commands run in tmp_path, where their stores, keys, logs and
    endpoints file (`.skyfuse/…`) go."""
    monkeypatch.chdir(tmp_path)
    return fleet_env(backend, tmp_path)


def test_publish_refuses_invalid_data_naming_each_field(env):
    run = cli(env, "publish", "shard.ready", "--data", '{"run_id": "r1", "rows": 0}')
    assert run.returncode == 2
    assert "rows: 0 is less than the minimum of 1" in run.stderr and "'shard_id' is a required property" in run.stderr


def test_publish_refuses_unknown_types_and_bad_json(env):
    run = cli(env, "publish", "shard.redy", "--sample")
    assert run.returncode == 2 and "expected one of" in run.stderr
    run = cli(env, "publish", "shard.ready", "--data", "{oops")
    assert run.returncode == 2 and "not valid JSON" in run.stderr


def test_publish_refuses_to_sign_what_the_catalog_does_not_let_the_signer_emit(env):
    run = cli(env, "publish", "placement.changed", "--sample")
    assert run.returncode == 2
    assert "cli may not emit placement.changed" in run.stderr and "--as aws/scheduler" in run.stderr, run.stderr
    run = cli(env, "publish", "metrics.sampled", "--sample", "--as", "aws/inference")  # the sample speaks for gcp
    assert run.returncode == 2 and "may not speak for cloud 'gcp'" in run.stderr, run.stderr


def test_bad_config_names_the_key(env, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[delivery]\nmax_atempts = 3\n')
    run = cli(env, "--config", str(bad), "status")
    assert run.returncode == 2 and "delivery.max_atempts" in run.stderr and "did you mean 'max_attempts'" in run.stderr


def test_selftest_shows_every_event_reaching_every_cloud(env):
    run = cli(env, "selftest")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "every event reached its function in every cloud" in run.stdout
    assert run.stdout.count("✓") == 9 * 3  # placement.changed reaches the deployer and the router


def serving(up, timeout_s=120):
    """What `up` wrote to endpoints.json once its servers answered; its output if it exited."""
    path, deadline = Path(".skyfuse") / "endpoints.json", time.monotonic() + timeout_s
    while not path.exists():
        assert up.poll() is None, f"up exited with {up.returncode}:\n{up.stdout.read()}"
        assert time.monotonic() < deadline, f"up wrote no {path} in {timeout_s} s"
        time.sleep(0.1)
    return json.loads(path.read_text())


def test_up_then_publish_each_sample_then_status(env, tmp_path):
    # the keys before the fleet: the commands below sign as they start, whether `up` has yet or not
    assert cli(env, "keys", "init").returncode == 0
    # --for: longer than any wait below, so that up never ends by itself mid-test (it is stopped at the end)
    up = subprocess.Popen([*SKYFUSE, "up", "--for", "600"], env={**os.environ, **env, "COLUMNS": "200"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # no wait for the hosts to join: a group without offsets reads from the earliest record
        dead_before = cli_json(env, "status", "--json")["dead_letters"]  # the broker is shared
        types = ["shard.ready", "round.started", "model.ready", "onnx.ready", "fused.ready", "metrics.sampled",
                 "placement.changed", "deployment.status"]
        for name in types:  # each signed as the producer the catalog allows
            producer = sample_producer(config.Fleet(), name, contracts.sample(name))
            run = cli(env, "publish", name, "--sample", "--as", producer)
            assert run.returncode == 0 and f"published {name}" in run.stdout, run.stderr
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert up.poll() is None, f"up exited with {up.returncode}:\n{up.stdout.read()}"
            status = cli_json(env, "status", "--json")
            if all(f["lag"] == 0 for f in status["functions"]):
                break
            time.sleep(0.5)
        # inference runs with the local API key: `predict` sends it (and gets past it), a bare call gets 401
        endpoint = serving(up)["clouds"]["aws"]
        predicted = cli(env, "predict", "--cloud", "aws", "--data", '{"instances": [[1, 2, 3, 4]]}')
        answer = json.loads(predicted.stdout)  # 503 with no model placed here, 200 or 400 with one
        assert "predictions" in answer or answer["detail"]["code"] in ("no_model", "row_width"), answer
        routed = json.loads(cli(env, "predict", "--data", '{"instances": [[1, 2, 3, 4]]}').stdout)  # the router
        assert "predictions" in routed or routed["detail"]["code"] in ("no_model", "row_width"), routed
        assert "router" in json.loads((Path(".skyfuse") / "endpoints.json").read_text())
        bare = urllib.request.Request(f"{endpoint}/predict", b'{"instances": [[1, 2, 3, 4]]}',
                                      {"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bare, timeout=10)
        assert refused.value.code == 401
    finally:
        up.terminate()
        output, _ = up.communicate(timeout=60)
    assert up.returncode == 0, output
    assert all(f["lag"] == 0 for f in status["functions"]), (status, output[-4000:])  # what up did, if not
    # the samples point at s3:// and gs:// buckets this fleet cannot reach: the trainer and exporter
    # reject them with that reason instead of retrying forever
    for function, uri in (("trainer", contracts.sample("shard.ready")["uri"]),
                          ("exporter", contracts.sample("model.ready")["model_uri"])):
        assert status["dead_letters"][function] > dead_before[function]  # (round.started may add a second)
        reasons = [row["reason"] for row in cli_json(env, "dlq", function, "--json", "--limit", "100000")]
        assert any(uri in reason and "cannot be read" in reason for reason in reasons), reasons
    for cloud in ("aws", "gcp", "azure"):  # every event type delivered in every cloud
        for name in types:
            assert any(cloud in line and name in line and (" ok " in line or " rejected " in line)
                       for line in output.splitlines()), (cloud, name)
    # what the trainer refused shows as such, with its reason, not as "ok"
    assert any("trainer" in line and " rejected " in line and "cannot be read" in line for line in output.splitlines())
    assert "stopping" in output


def test_dlq_lists_what_was_given_up_and_why(env, bus):
    bus.ensure_topics(["skyfuse.shard.ready"], 3)
    bus.publish("skyfuse.shard.ready", b"garbage", b"x")
    up = subprocess.Popen([*SKYFUSE, "up", "--function", "trainer", "--cloud", "aws", "--for", "300"],
                          env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, listed = time.monotonic() + 240, []
        while time.monotonic() < deadline and up.poll() is None:  # as long as the consumer needs to join
            listed = cli_json(env, "dlq", "trainer", "--json", "--limit", "100000")
            if any(row["cloud"] == "aws" and "not a CloudEvent" in row["reason"] for row in listed):
                break
            time.sleep(0.5)
    finally:
        up.terminate()
        _, stderr = up.communicate(timeout=120)
    assert up.returncode == 0, stderr
    assert any(row["cloud"] == "aws" and "not a CloudEvent" in row["reason"] for row in listed), listed
