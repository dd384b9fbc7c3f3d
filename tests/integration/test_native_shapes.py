"""Each cloud's native event shape, checked against the golden samples in tests/golden/ and against
the cloud libraries' own parsers, then end to end from a published event to the real entry points
of services/ in all three clouds."""
import json
import random
import threading
import time
from pathlib import Path

import orjson
import pytest
from aws_lambda_powertools.utilities.parser.models import KafkaMskEventModel, KafkaSelfManagedEventModel

from skyfuse import contracts, events
from skyfuse.bus.base import Record
from skyfuse.dev.fleet import Fabric, build_hosts
from skyfuse.runtime.clouds.aws import LambdaContext, kafka_event, kafka_record, native_size
from skyfuse.runtime.clouds.azure import decode_payload, kafka_trigger_functions, trigger_payload
from skyfuse.runtime.function import Runtime, hosted
from tests.conftest import signed_event

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
GOLDEN_ID = "7d5f0bb4-3c1e-4f0e-9d43-5c0b7c2e9a11"


def golden(name):
    return json.loads((GOLDEN / name).read_text())


def sample_record(offset=15, **data_changes):
    event = signed_event("shard.ready", {**contracts.sample("shard.ready"), **data_changes}, "cli")
    key, value, headers = events.encode(event)
    return event, Record("skyfuse.shard.ready", 0, offset, key, value, headers, 1795737600000)


@pytest.fixture
def runtime(tmp_path):
    from skyfuse import config

    # the golden files are the clouds' documented shapes around one fixed, unsigned event; signatures
    # are tested on their own (test_signing) and through every shape by the host tests
    fleet = config.load(environ={"SKYFUSE_BUS__EMBEDDED__PATH": str(tmp_path / "bus"),
                                 "SKYFUSE_CLOUDS__AWS__STORE": f"file://{tmp_path}/stores/aws",
                                 "SKYFUSE_SIGNING__ENABLED": "false"})
    with hosted(Runtime("aws", "trainer", fleet)) as rt:
        yield rt


def core_saw(runtime) -> list[str]:
    """Ids of the events the trainer core received: handled, or rejected into trainer.dlq. (The
    golden shard lives in s3://skyfuse-aws, a store this local fleet does not have, so the core
    rejects it with that reason: proof it got the decoded event.)"""
    from skyfuse.runtime import deadletter

    rejected = [deadletter.describe(r.headers) for r in runtime.bus.read("trainer.dlq")] \
        if "trainer.dlq" in runtime.bus.topics() else []
    assert all("s3://skyfuse-aws" in r["reason"] for r in rejected)
    return runtime.handled + [r["event_id"] for r in rejected]


# -- AWS Lambda ---------------------------------------------------------------------------------
def test_aws_handler_takes_the_documented_msk_event(runtime):
    from services.trainer.aws import lambda_handler

    event = golden("aws_msk_event.json")
    KafkaMskEventModel.model_validate(event)  # the golden file is a well-formed MSK event
    response = lambda_handler(event, LambdaContext("skyfuse-trainer"))
    assert response == {"batchItemFailures": []}
    assert core_saw(runtime) == [GOLDEN_ID]


def test_aws_handler_reports_a_bad_record_by_topic_partition_and_offset(runtime):
    from services.trainer.aws import lambda_handler

    event = golden("aws_msk_event.json")
    good = event["records"]["skyfuse.shard.ready-0"][0]
    bad = {**good, "offset": 16, "value": "bm90IGpzb24="}  # "not json"
    after = {**good, "offset": 17}
    event["records"]["skyfuse.shard.ready-0"] = [good, bad, after]
    response = lambda_handler(event, LambdaContext("skyfuse-trainer"))
    # 17 is reported too: it sits behind 16 in the partition, so it waits to keep the order
    assert response == {"batchItemFailures": [
        {"itemIdentifier": {"partition": "skyfuse.shard.ready-0", "offset": 16}},
        {"itemIdentifier": {"partition": "skyfuse.shard.ready-0", "offset": 17}}]}
    assert core_saw(runtime) == [GOLDEN_ID]


def test_host_builds_the_self_managed_kafka_event_lambda_sends():
    _, record = sample_record()
    built = kafka_event([record], "127.0.0.1:9092")
    KafkaSelfManagedEventModel.model_validate(built)  # Powertools' own model of that event
    doc = golden("aws_msk_event.json")["records"]["skyfuse.shard.ready-0"][0]
    ours = built["records"]["skyfuse.shard.ready-0"][0]
    assert set(ours) == set(doc) and {k: type(v) for k, v in ours.items()} == {k: type(v) for k, v in doc.items()}
    assert all(isinstance(b, int) for header in ours["headers"] for v in header.values() for b in v)


def test_the_host_sizes_a_record_as_its_part_of_the_lambda_event_encodes():
    rng = random.Random(13)
    names = ["ce_id", "content-type", "ü-name", 'q"uote', "tab\t", ""]
    for _ in range(2000):
        headers = [(rng.choice(names), rng.randbytes(rng.randint(0, 60))) for _ in range(rng.randint(0, 8))]
        record = Record(rng.choice(["t", "tøpic", 'a"b\\c']), rng.randint(0, 10 ** rng.randint(0, 5)),
                        rng.randint(0, 10 ** rng.randint(0, 12)), rng.choice([None, b"", rng.randbytes(20)]),
                        rng.choice([None, b"", rng.randbytes(rng.randint(1, 3000))]), headers, rng.randint(0, 2 ** 45))
        assert native_size(record) == len(orjson.dumps(kafka_record(record))), record


# -- Azure Functions ---------------------------------------------------------------------------
def test_azure_function_takes_the_kafka_trigger_payload(runtime):
    from services.trainer.azure import app

    payload = golden("azure_kafka_trigger.json")
    (kafka_evt,) = decode_payload(payload)  # azure-functions' own converter
    assert kafka_evt.topic == "skyfuse.shard.ready" and kafka_evt.offset == 15 and kafka_evt.partition == 0
    assert kafka_evt.key == "r1"
    kafka_trigger_functions(app)["skyfuse.shard.ready"](decode_payload(payload))
    assert core_saw(runtime) == [GOLDEN_ID]


def test_host_builds_the_trigger_payload_the_functions_host_sends():
    event, record = sample_record()
    built = trigger_payload([record, record])
    doc = golden("azure_kafka_trigger.json")
    assert set(built["trigger_metadata"]) == set(doc["trigger_metadata"])
    assert {k: v["type"] for k, v in built["trigger_metadata"].items()} == \
           {k: v["type"] for k, v in doc["trigger_metadata"].items()}
    decoded = decode_payload(built)
    assert len(decoded) == 2 and json.loads(decoded[0].get_body()) == event.get_data()


# -- Google Cloud ------------------------------------------------------------------------------
def test_gcp_function_takes_a_binary_mode_cloudevent(runtime):
    import functions_framework

    import services.trainer.gcp as module

    doc = golden("gcp_cloudevent.json")
    app = functions_framework.create_app("trainer", module.__file__, "cloudevent")
    response = app.test_client().post("/", headers=doc["headers"], data=json.dumps(doc["body"]))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert core_saw(runtime) == [GOLDEN_ID]


def test_gcp_function_refuses_data_that_breaks_the_schema(runtime):
    import functions_framework

    import services.trainer.gcp as module

    doc = golden("gcp_cloudevent.json")
    app = functions_framework.create_app("trainer", module.__file__, "cloudevent")
    response = app.test_client().post("/", headers=doc["headers"], data=json.dumps({**doc["body"], "rows": 0}))
    assert response.status_code == 500 and core_saw(runtime) == []


# -- end to end ----------------------------------------------------------------------------------
def test_published_event_reaches_the_trainer_in_every_cloud_in_its_native_shape(fleet, bus):
    deliveries, lock = [], threading.Lock()

    def seen(delivery):
        with lock:
            deliveries.append(delivery)

    hosts = build_hosts(fleet, bus, seen, functions=["trainer"])
    bus.ensure_topics(contracts.topics_for("trainer") + ["trainer.dlq"], fleet.bus.partitions)
    event = signed_event("shard.ready", {**contracts.sample("shard.ready"), "run_id": f"e2e-{time.time_ns()}"}, "cli")
    key, value, headers = events.encode(event)
    with Fabric(hosts):
        bus.publish("skyfuse.shard.ready", value, key, headers)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                mine = {d.cloud: d for d in deliveries if d.event_id == event["id"]}
            if len(mine) == 3:
                break
            time.sleep(0.05)
    # the sample's shard is aws's, in s3://skyfuse-aws, which this fleet does not have: aws's trainer
    # rejects it with that reason; the others' pass it by (not their cloud)
    assert {c: d.result for c, d in mine.items()} == {"aws": "rejected", "gcp": "ok", "azure": "ok"}
    assert "s3://skyfuse-aws" in mine["aws"].reason
    assert {c: d.shape for c, d in mine.items()} == {h.cloud: h.invoker.shape for h in hosts}
    from skyfuse.runtime import deadletter

    dead_letters = bus.read("trainer.dlq", 100_000)
    rejected = {(d["cloud"], d["event_id"]) for d in map(deadletter.describe, (r.headers for r in dead_letters))}
    for host in hosts:  # each cloud's core saw the event, through its own entry point
        assert event["id"] in host.runtime.handled or (host.cloud, event["id"]) in rejected
