"""The training half end to end: shards in each cloud's store, trainers, exporters, the fuser,
on both buses, through the real entry points of every cloud."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from skyfuse import config, contracts, events, training
from skyfuse.bus import open_bus
from skyfuse.dev.fleet import Fabric, build_hosts, build_timers
from skyfuse.runtime.function import Runtime, hosted
from skyfuse.storage import fetch, keys, open_store
from tests.conftest import fleet_env, signed_event

REPO = Path(__file__).resolve().parents[2]
FAST = {"SKYFUSE_TRAINING__EPOCHS": 30, "SKYFUSE_TRAINING__FINETUNE_EPOCHS": 3, "SKYFUSE_TRAINING__HIDDEN": "[16]",
        "SKYFUSE_TRAINING__TIMER_S": 0.3}


def env_for(backend, tmp_path, **extra):
    from skyfuse.dev.hosts import free_port

    clouds = ("aws", "gcp", "azure")
    stores = {f"SKYFUSE_CLOUDS__{c.upper()}__STORE": f"file://{tmp_path}/stores/{c}" for c in clouds}
    ports = {f"SKYFUSE_CLOUDS__{c.upper()}__INFERENCE_PORT": str(free_port()) for c in clouds}
    return {**fleet_env(backend, tmp_path), **stores, **ports, **{k: str(v) for k, v in {**FAST, **extra}.items()}}


@pytest.fixture(scope="module")
def breast_cancer_csv(tmp_path_factory):
    from skyfuse.ml import data as mldata

    path = tmp_path_factory.mktemp("data") / "breast_cancer.csv"
    path.write_bytes(mldata.to_csv_bytes(mldata.sample_dataset("breast_cancer")))
    return path


def run_cli(env, *args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "skyfuse.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env, "PYTHONPATH": str(REPO)}, timeout=timeout)


def test_train_end_to_end_from_the_command_line(backend, tmp_path, breast_cancer_csv):
    env = env_for(backend, tmp_path)
    run = run_cli(env, "train", str(breast_cancer_csv), "--target", "diagnosis", "--rounds", "2", "--json",
                  cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert [s["cloud"] for s in summary["shards"]] == ["aws", "gcp", "azure"]
    assert sum(s["rows"] for s in summary["shards"]) == summary["rows"]["train"]
    assert all(0.8 <= s["accuracy"] <= 1 for s in summary["shards"])
    # auto: the ensembles, and the server steps scored each round (fedadam and fedyogi from round 1)
    assert set(summary["strategies"]) == {"wavg", "vote", "confidence", "fedavg", "fedadam", "fedyogi"}
    assert summary["fused"]["strategy"] in summary["strategies"]
    assert summary["fused"]["accuracy"] == summary["strategies"][summary["fused"]["strategy"]]
    assert summary["fused"]["accuracy"] >= 0.88 and summary["centralized_accuracy"] >= 0.88
    assert {"train_s", "export_s", "fusion_s", "centralized_train_s", "serving_s"} <= set(summary["timings"])
    # placed, deployed and answering: every placed endpoint predicts what the fused model predicts here
    assert summary["serving"], "the fused model was not served anywhere"
    for cloud, serving in summary["serving"].items():
        assert serving["status"] == 200 and serving["model_version"] == summary["fused"]["version"]
        assert serving["agree"] == serving["rows"] == summary["rows"]["test"], cloud
    run_id = summary["run_id"]
    for i, cloud in enumerate(["aws", "gcp", "azure"]):  # each shard and its models stayed in its own cloud
        store = tmp_path / "stores" / cloud / "runs" / run_id
        assert (store / "shards" / f"{i}.csv").is_file()
        assert (store / "round-0" / "models" / f"{cloud}-{i}.keras").is_file()
        assert (store / "round-1" / "onnx" / f"{cloud}-{i}.onnx").is_file()
        others = {"aws", "gcp", "azure"} - {cloud}
        assert not any((tmp_path / "stores" / o / "runs" / run_id / "shards" / f"{i}.csv").exists() for o in others)
    fused = fetch(summary["fused"]["model_uri"])
    from skyfuse.ml import fusion

    lineage = fusion.lineage(fused)
    assert {m["cloud"] for m in lineage["members"]} == {"aws", "gcp", "azure"}
    assert lineage["strategy"] == summary["fused"]["strategy"]
    report = run_cli(env, "report", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    png = tmp_path / ".skyfuse" / "runs" / run_id / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in (png.parent / "report.html").read_text()


def test_train_refuses_bad_input_with_a_clear_message(tmp_path, breast_cancer_csv):
    env = env_for("embedded", tmp_path)
    run = run_cli(env, "train", str(breast_cancer_csv), "--target", "label", cwd=tmp_path)
    assert run.returncode == 2 and "target" in run.stderr and "label" in run.stderr
    run = run_cli(env, "train", str(breast_cancer_csv), "--target", "diagnosis", "--partition", "skewed", cwd=tmp_path)
    assert run.returncode == 2 and "label-skew:ALPHA" in run.stderr
    run = run_cli(env, "train", str(tmp_path / "nope.csv"), "--target", "diagnosis", cwd=tmp_path)
    assert run.returncode == 2 and "no such file" in run.stderr
    cnn = str(REPO / "tests" / "models" / "digits_cnn.py")
    run = run_cli(env, "train", str(breast_cancer_csv), "--target", "diagnosis", "--model", f"{cnn}:nope", cwd=tmp_path)
    assert run.returncode == 2 and "found:" in run.stderr, run.stderr  # names the functions the file has
    run = run_cli(env, "train", str(breast_cancer_csv), "--target", "diagnosis", "--model", f"{cnn}:build",
                  cwd=tmp_path)
    # its input is 8x8, not 30
    assert run.returncode == 2 and "64" in run.stderr and "30" in run.stderr, run.stderr


def test_weights_are_checked_before_anything_runs(tmp_path, breast_cancer_csv):
    env = env_for("embedded", tmp_path)
    cases = {"aws=0.5,gcp=x": "is not CLOUD=NUMBER", "aws=0.5,gcp=0.5": "missing: azure",
             "aws=1,gcp=1,azure=1,mars=1": "not in the run: mars", "aws=-1,gcp=1,azure=1": "finite and >= 0",
             "aws=0,gcp=0,azure=0": "all 0", "aws=1,aws=2,gcp=1,azure=1": "aws is given twice"}
    for spec, said in cases.items():
        run = run_cli(env, "train", str(breast_cancer_csv), "--target", "diagnosis", "--weights", spec, cwd=tmp_path)
        assert run.returncode == 2 and said in " ".join(run.stderr.split()), (spec, run.stderr)  # unwrapped
    run = run_cli(env, "train", str(breast_cancer_csv), "--target", "diagnosis", "--clouds", "aws,mars", cwd=tmp_path)
    assert run.returncode == 2 and "configured: aws, gcp, azure" in " ".join(run.stderr.split())


def test_five_clouds_configured_twelve_shards_over_three_user_weights_served(tmp_path, breast_cancer_csv):
    """A skyfuse.toml in the working directory names five clouds (two of them by provider); every
    server the fleet starts reads it; 4 shards in each of three clouds are fused with the user's
    cloud weights, shared inside each cloud by rows, and served."""
    from skyfuse.dev.hosts import free_port

    clouds = {"aws": "aws", "aws-eu": "aws", "gcp": "gcp", "azure": "azure", "azure-west": "azure"}
    ports = {name: free_port() for name in clouds}
    (tmp_path / "skyfuse.toml").write_text("".join(
        f'[clouds.{name}]\nprovider = "{provider}"\nstore = "file://{tmp_path}/stores/{name}"\n'
        f"inference_port = {ports[name]}\n\n" for name, provider in clouds.items()))
    env = {**fleet_env("embedded", tmp_path), **{k: str(v) for k, v in FAST.items()}}
    run = run_cli(env, "train", str(breast_cancer_csv), "--target", "diagnosis", "--clouds", "aws-eu,gcp,azure-west",
                  "--shards-per-cloud", "4", "--fusion", "wavg", "--weights", "aws-eu=1,gcp=1,azure-west=2", "--json",
                  cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert [s["cloud"] for s in summary["shards"]] == ["aws-eu", "gcp", "azure-west"] * 4
    assert sum(s["rows"] for s in summary["shards"]) == summary["rows"]["train"]
    assert summary["fused"]["weights"] == {"aws-eu": 0.25, "gcp": 0.25, "azure-west": 0.5}
    assert summary["fused"]["accuracy"] >= 0.85
    assert summary["placements"]
    assert all({"at", "trigger", "serving", "reason"} <= set(p) for p in summary["placements"])
    assert summary["serving"] and set(summary["serving"]) <= set(clouds)
    for cloud, serving in summary["serving"].items():
        assert serving["status"] == 200 and serving["agree"] == serving["rows"], cloud
    assert not (tmp_path / ".skyfuse" / "endpoints.json").exists()
    import socket

    for name, port in ports.items():  # every server it started was stopped
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"{name}'s server still listens on {port}"


class Pipeline:
    """The training functions of all three clouds running in this process."""

    def __init__(self, fleet, bus):
        functions = ["trainer", "exporter", "fuser"]
        self.fabric = Fabric(build_hosts(fleet, bus, functions=functions),
                             build_timers(fleet, bus, functions=functions))

    def __enter__(self):
        self.fabric.start()
        return self

    def __exit__(self, *exc):
        self.fabric.stop()


def run_events(bus, run_id, type_name):
    topic = contracts.event_type(type_name).topic
    found = []
    for record in bus.read(topic, 10_000):
        event = events.decode(record.key, record.value, record.headers)
        if event.get_data().get("run_id") == run_id:
            found.append(event)
    return found


def test_a_shard_that_cannot_train_is_dead_lettered_and_the_round_fuses_on_quorum(tmp_path):
    from skyfuse.ml import data as mldata

    fleet = config.load(environ=env_for("embedded", tmp_path))
    bus = open_bus(fleet)
    dataset = mldata.sample_dataset("breast_cancer")
    plan = training.Plan(target="diagnosis", clouds=["aws", "gcp", "azure"], fusion="fedavg", rounds=2, timeout_s=2)
    prepared = training.prepare(fleet, dataset, plan)
    # azure's shard holds a single class: nothing can be learned from it
    azure = prepared.shard_events[2]
    data = azure.get_data()
    shard = prepared.shards[2][1]
    one_class = shard.subset([i for i in range(len(shard)) if shard.y[i] == shard.y[0]])
    saved = open_store(fleet.clouds["azure"].store).put(keys.shard(plan.run_id, "2"), mldata.to_csv_bytes(one_class))
    prepared.shard_events[2] = signed_event("shard.ready", {**data, "sha256": saved.sha256, "rows": len(one_class),
                                                            "bytes": saved.size}, "cli", fleet)
    with Pipeline(fleet, bus):
        progress = training.follow(bus, prepared, lambda p: None, timeout_s=300)
    assert progress.fused is not None, progress.failures
    assert progress.fused["missing_clouds"] == ["azure"]
    assert {m["cloud"] for m in progress.fused["members"]} == {"aws", "gcp"}
    (failure,) = [f for f in progress.failures if f["function"] == "trainer"]
    assert failure["cloud"] == "azure" and "class" in failure["reason"]
    (next_round,) = run_events(bus, plan.run_id, "round.started")  # waits for the two members it has, not three
    assert next_round.get_data()["manifest"]["expected_members"] == 2
    assert next_round.get_data()["clouds"] == ["aws", "gcp"]


def test_an_empty_shard_file_is_dead_lettered_with_the_reason(tmp_path):
    from services.trainer.handler import handle

    fleet = config.load(environ=env_for("embedded", tmp_path))
    bus = open_bus(fleet)
    store = open_store(fleet.clouds["aws"].store)
    empty = store.put(keys.shard("r-empty", "0"), b"")
    data = {**contracts.sample("shard.ready"), "run_id": "r-empty", "cloud": "aws", "uri": empty.uri,
            "sha256": empty.sha256}
    data.pop("model")
    event = signed_event("shard.ready", data, "cli", fleet)
    runtime = Runtime("aws", "trainer", fleet, bus_factory=lambda: bus)
    from skyfuse.runtime.function import run_handler

    with hosted(runtime):
        run_handler(handle, event, runtime)
    (dead,) = bus.read("trainer.dlq")
    reason = dict(dead.headers)["skyfuse_dlq_reason"].decode()
    assert "empty" in reason and empty.uri in reason
    assert events.decode(dead.key, dead.value, dead.headers)["id"] == event["id"]


def test_duplicated_model_ready_and_onnx_ready_export_and_fuse_once(tmp_path):
    from skyfuse.ml import data as mldata

    fleet = config.load(environ=env_for("embedded", tmp_path))
    bus = open_bus(fleet)
    plan = training.Plan(target="diagnosis", clouds=["aws", "gcp", "azure"], fusion="vote", rounds=1)
    prepared = training.prepare(fleet, mldata.sample_dataset("breast_cancer"), plan)
    with Pipeline(fleet, bus):
        progress = training.follow(bus, prepared, lambda p: None, timeout_s=300)
        assert progress.fused is not None
        for type_name in ("model.ready", "onnx.ready"):  # deliver each of them again
            for event in run_events(bus, plan.run_id, type_name):
                key, value, headers = events.encode(event)
                bus.publish(events.topic_of(event), value, key, headers)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(bus.lag(f"{c}.{f}", t) for c in fleet.clouds
                                                  for f in ("exporter", "fuser") for t in contracts.topics_for(f)):
            time.sleep(0.2)
        # lag 0 is enough: a second export or fusion publishes its event before committing
    # the copies published above share their originals' ids; a second export or fusion would have a new one
    assert len({e["id"] for e in run_events(bus, plan.run_id, "onnx.ready")}) == 3  # one export per model
    assert len({e["id"] for e in run_events(bus, plan.run_id, "fused.ready")}) == 1  # one fusion per round
