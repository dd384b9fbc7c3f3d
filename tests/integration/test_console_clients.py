"""Records written by Kafka's own console producer (a client no one here wrote) reach the function
hosts as the CloudEvents Kafka binding says: a record without an id is dead-lettered at once with
the reason, and a structured-mode event is delivered to every cloud's entry point, Google Cloud's
functions-framework included. The events are signed here (as `skyfuse publish` signs them); the
console producer carries the signature as plain headers or envelope attributes."""
import json
import subprocess
from pathlib import Path

import pytest

from skyfuse import config, contracts, events
from skyfuse.bus import open_bus
from tests.conftest import KAFKA, fleet_env, signed_event
from tests.functions import probe_state
from tests.integration.test_host import Running, clean_probe  # noqa: F401 (the probe is reset around each test)

pytestmark = pytest.mark.kafka
LIB = Path(__file__).resolve().parents[2] / "infra" / "kafka" / "lib"


@pytest.fixture
def kafka_bus(kafka_bootstrap, tmp_path):
    fleet = config.load(environ=fleet_env("kafka", tmp_path))
    bus = open_bus(fleet)
    yield fleet, bus
    bus.close()


def console_produce(topic: str, lines: list[str]) -> None:
    """Kafka's ConsoleProducer, with `headers<TAB>key<TAB>value` lines."""
    run = subprocess.run(
        ["java", "-cp", f"{LIB}/*", "org.apache.kafka.tools.ConsoleProducer", "--bootstrap-server", KAFKA,
         "--topic", topic, "--reader-property", "parse.headers=true", "--reader-property", "parse.key=true"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def shard(shard_id: str) -> dict:
    return {**contracts.sample("shard.ready"), "shard_id": shard_id, "run_id": "r1"}


def console_headers(event, drop=()) -> str:
    """The event's binary-mode headers as ConsoleProducer's `name:value,…` (no value holds a comma)."""
    _, _, headers = events.encode(event)
    return ",".join(f"{name}:{value.decode()}" for name, value in headers if name not in drop)


@pytest.mark.parametrize("provider", ["aws", "gcp", "azure"])
def test_a_record_without_an_id_is_dead_lettered_and_the_next_one_handled(kafka_bus, provider, uid):
    fleet, bus = kafka_bus
    topic = f"console-noid-{uid}"
    bus.ensure_topics([topic], 1)
    no_id = signed_event("shard.ready", shard("no-id"), "cli")
    with_id = signed_event("shard.ready", shard("with-id"), "cli", event_id="e-2")
    console_produce(topic, [f"{console_headers(no_id, drop=('ce_id',))}\tr1\t{json.dumps(shard('no-id'))}",
                            f"{console_headers(with_id)}\tr1\t{json.dumps(shard('with-id'))}"])
    with Running(bus, fleet, provider, topic, uid) as run:
        run.wait(lambda: run.results("ok") and run.results("dead-lettered"))
    assert probe_state.HANDLED == [("with-id", provider)]
    [dead] = run.results("dead-lettered")
    assert "not a valid CloudEvent: missing required attribute(s) id" in dead.reason and dead.attempts == 0
    assert [d.event_id for d in run.results("ok")] == ["e-2"]


@pytest.mark.parametrize("provider", ["aws", "gcp", "azure"])
def test_a_structured_mode_event_reaches_every_clouds_entry_point(kafka_bus, provider, uid):
    fleet, bus = kafka_bus
    topic = f"console-structured-{uid}"
    bus.ensure_topics([topic], 1)
    event = signed_event("shard.ready", shard("structured"), "cli", event_id="s-1")
    envelope = {**event.get_attributes(), "data": shard("structured")}
    console_produce(topic, [f"content-type:application/cloudevents+json\tr1\t{json.dumps(envelope)}"])
    with Running(bus, fleet, provider, topic, uid) as run:
        run.wait(lambda: run.results("ok") or run.results("dead-lettered"))
    assert not run.results("dead-lettered"), run.results("dead-lettered")[0].reason
    assert probe_state.HANDLED == [("structured", provider)] and run.results("ok")[0].event_id == "s-1"
