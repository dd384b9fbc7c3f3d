"""A user's own Keras model through the whole pipeline: a small CNN on scikit-learn's 8×8 digits,
trained in three clouds from one template, exported, fused by every strategy (FedAvg over two
rounds), placed and served by the local fleet's inference servers; and FedAvg refusing members of
two architectures, with the difference in the dead letter."""
import http.client
import time
from urllib.parse import urlsplit

import onnx
import orjson

from skyfuse import config, contracts, events, training
from skyfuse.bus import open_bus
from skyfuse.dev import local
from skyfuse.ml import data as mldata
from skyfuse.ml import fusion
from skyfuse.storage import fetch, keys, open_store
from tests.conftest import signed_event
from tests.integration.test_training import REPO, Pipeline, env_for, run_events

CNN = f"{REPO}/tests/models/digits_cnn.py:build"
CLOUDS = ["aws", "gcp", "azure"]


def post_predict(endpoint: str, rows, api_key: str) -> dict:
    url = urlsplit(endpoint)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("POST", f"{url.path}/predict", orjson.dumps({"instances": rows}),
                 {"content-type": "application/json", "x-api-key": api_key})
    response = conn.getresponse()
    body = orjson.loads(response.read())
    conn.close()
    assert response.status == 200, body
    return body


def test_a_users_cnn_on_digits_is_trained_fused_and_served(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the fleet's endpoints file and server logs
    fleet = config.load(environ=env_for("embedded", tmp_path, SKYFUSE_TRAINING__EPOCHS=20))
    bus = open_bus(fleet)
    local.prepare(fleet)  # signing keys and the inference API key, as `skyfuse train` makes them
    plan = training.Plan(target="digit", clouds=CLOUDS, fusion="auto", rounds=2, model=CNN)
    prepared = training.prepare(fleet, mldata.sample_dataset("digits"), plan)
    given = prepared.shard_events[0].get_data()["model"]
    assert given["template_uri"].endswith(keys.model_template(plan.run_id)) and "standardization" not in given
    assert all(e.get_data()["model"] == given for e in prepared.shard_events)  # one template for every trainer
    with local.LocalFleet(fleet, bus) as running:
        endpoints = {c: s.url for c, s in running.servers.items()}
        progress = training.follow(bus, prepared, lambda p: None, timeout_s=600, until_served=True)
        assert progress.fused is not None and progress.deployed, progress.failures
        assert progress.failures == []
        served = training.check_serving(progress, endpoints, prepared.test, local.api_key(fleet))
        first = progress.placed[0]
        answer = post_predict(endpoints[first], prepared.test.X.tolist(), local.api_key(fleet))
    fused = progress.fused
    # every member is the user's CNN, trained in its own cloud; FedAvg averaged them over two rounds
    assert progress.trained == {0: 3, 1: 3} and progress.exported == {0: 3, 1: 3}
    for (round_, shard_id), member in progress.members.items():
        ops = {n.op_type for n in onnx.load_from_string(fetch(member["onnx_uri"])).graph.node}
        assert {"Conv", "MaxPool"} <= ops, (round_, shard_id)
        assert member["parity_max_abs_diff"] <= 1e-5
    ensembles = {"wavg", "vote", "confidence"}
    assert ensembles < set(fused["strategies"])
    assert all(s.startswith("fed") for s in set(fused["strategies"]) - ensembles)
    test = prepared.test
    accuracy = {s: fusion.accuracy(fetch(uri), test) for s, uri in fused["candidates"].items()}
    assert min(accuracy.values()) >= 0.8, accuracy  # chance is 0.1
    # served: every placed cloud answers with the fused model, as it predicts here
    assert served and all(s["status"] == 200 and s["model_version"] == fused["version"] for s in served.values())
    assert all(s["agree"] == s["rows"] == len(test) for s in served.values()), served
    labels = [str(c) for c in fused["classes"]]
    hits = sum(p["class"] == labels[y] for p, y in zip(answer["predictions"], test.y, strict=True))
    assert answer["model_version"] == fused["version"] and hits / len(test) >= 0.8, hits
    # the centralized baseline trains the same CNN on all training rows
    central, _ = training.centralized(fleet, prepared)
    assert central >= 0.8
    bus.close()


def two_architectures(tmp_path, fusion_name):
    """A run whose azure shard names another CNN (8 filters → 4): as if published by hand."""
    from skyfuse.ml import model as mlmodel

    fleet = config.load(environ=env_for("embedded", tmp_path, SKYFUSE_TRAINING__EPOCHS=3))
    bus = open_bus(fleet)
    plan = training.Plan(target="digit", clouds=CLOUDS, fusion=fusion_name, rounds=2, model=CNN)
    prepared = training.prepare(fleet, mldata.sample_dataset("digits"), plan)
    template = mlmodel.from_bytes(fetch(prepared.shard_events[0].get_data()["model"]["template_uri"]))
    layers = template.get_config()["layers"]
    for layer in layers:
        layer.pop("build_config", None)  # shapes follow from the input again
    next(layer for layer in layers if layer["class_name"] == "Conv2D")["config"]["filters"] = 4
    other = mlmodel.keras.Sequential.from_config({"name": "other", "layers": layers})
    saved = open_store(fleet.clouds["aws"].store).put(f"runs/{plan.run_id}/other.keras", mlmodel.to_bytes(other))
    data = prepared.shard_events[2].get_data()
    model = {**data["model"], "template_uri": saved.uri, "template_sha256": saved.sha256}
    prepared.shard_events[2] = signed_event("shard.ready", {**data, "model": model}, "cli", fleet)
    return fleet, bus, prepared


def test_fedavg_dead_letters_members_of_two_architectures_with_the_difference(tmp_path):
    fleet, bus, prepared = two_architectures(tmp_path, "fedavg")
    run_id, topic = prepared.plan.run_id, contracts.dlq_topic("fuser")
    with Pipeline(fleet, bus):
        for event in prepared.shard_events:
            key, value, headers = events.encode(event)
            bus.publish(events.topic_of(event), value, key, headers)
        deadline, dead = time.monotonic() + 300, []
        while time.monotonic() < deadline and not dead:
            records = bus.read(topic, 1000) if topic in bus.topics() else []
            dead = [r for r in records if orjson.loads(r.value)["run_id"] == run_id]
            time.sleep(0.2)
    assert dead, "the fuser did not dead-letter the round"
    reason = dict(dead[0].headers)["skyfuse_dlq_reason"].decode()
    assert "fedavg needs the same model architecture in every member, and azure-2 differs from aws-0" in reason
    assert "[3, 3, 1, 8]" in reason and "[3, 3, 1, 4]" in reason, reason
    assert run_events(bus, run_id, "fused.ready") == [] and run_events(bus, run_id, "round.started") == []
    bus.close()


def test_auto_fuses_members_of_two_architectures_with_the_ensembles_only(tmp_path):
    fleet, bus, prepared = two_architectures(tmp_path, "auto")
    with Pipeline(fleet, bus):
        progress = training.follow(bus, prepared, lambda p: None, timeout_s=300)
    assert progress.fused is not None, progress.failures
    assert set(progress.fused["strategies"]) == {"wavg", "vote", "confidence"}
    assert progress.fused["round"] == 0 and run_events(bus, prepared.plan.run_id, "round.started") == []
    bus.close()
