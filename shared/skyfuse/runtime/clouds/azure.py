"""Azure Functions' Kafka trigger with cardinality "many", both sides.

Host side: what the Functions host hands the Python worker for a batch (the values as a string
collection, and `KeyArray`, `PartitionArray`, `OffsetArray`, `TopicArray`, `TimestampArray`,
`HeadersArray` as trigger metadata), decoded by azure-functions' own Kafka converter into
`KafkaEvent`s and passed to the v2 `FunctionApp` function bound to the topic. Batches of up to 64
(the extension's default `MaxBatchSize`). A raised exception fails the whole batch: the trigger
has no partial-failure response.

Function side: `register_kafka_triggers` adds one trigger function per topic of a skyfuse function.
"""
from __future__ import annotations

import base64
import functools
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import azure.functions as func
from azure.functions.decorators.kafka import KafkaTrigger
from azure.functions.kafka import KafkaTriggerConverter
from azure.functions.meta import Datum
from cloudevents.http import CloudEvent

from skyfuse import contracts, events
from skyfuse.bus.base import Record
from skyfuse.runtime.clouds.aws import load_handler
from skyfuse.runtime.clouds.base import Invoker, Limits, Outcome
from skyfuse.runtime.function import Handler, current, run_handler

KAFKA_TRIGGER = Limits(max_records=64, max_wait_s=0.2, max_bytes=100 * 1024 * 1024)


def trigger_payload(records: list[Record]) -> dict[str, Any]:
    """The invocation as JSON: `data` and `trigger_metadata`, each value with its worker type."""
    def as_json(values: list[Any]) -> dict[str, str]:
        return {"type": "json", "value": json.dumps(values)}

    return {
        "data": {"type": "collection_string", "value": [(r.value or b"").decode() for r in records]},
        "trigger_metadata": {
            "KeyArray": as_json([r.key.decode() if r.key is not None else None for r in records]),
            "PartitionArray": as_json([r.partition for r in records]),
            "OffsetArray": {"type": "collection_sint64", "value": [r.offset for r in records]},
            "TopicArray": {"type": "collection_string", "value": [r.topic for r in records]},
            "TimestampArray": as_json([
                datetime.fromtimestamp(r.timestamp_ms / 1000, UTC).isoformat() for r in records]),
            "HeadersArray": as_json([
                [{"Key": k, "Value": base64.b64encode(v).decode()} for k, v in r.headers] for r in records]),
        },
    }


def _datum(typed: dict[str, Any]) -> Datum:
    kind, value = typed["type"], typed["value"]
    if kind.startswith("collection_"):  # the worker's protobuf collections expose a typed list
        value = SimpleNamespace(**{kind.removeprefix("collection_"): value})
    return Datum(value, kind)


def decode_payload(payload: dict[str, Any]) -> list[func.KafkaEvent]:
    """What the Python worker passes a `List[func.KafkaEvent]` parameter, via the real converter."""
    metadata = {name: _datum(typed) for name, typed in payload["trigger_metadata"].items()}
    decoded = KafkaTriggerConverter.decode(_datum(payload["data"]), trigger_metadata=metadata)
    return decoded if isinstance(decoded, list) else [decoded]  # a collection decodes to a list


class _DropAuthLevelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Auth level is not applied")


@functools.cache  # get_functions() may run once per app: a second call fails its name check
def kafka_trigger_functions(app: func.FunctionApp) -> dict[str, Callable[..., Any]]:
    """topic → the user function of the app's Kafka trigger on it."""
    out = {}
    quiet = _DropAuthLevelWarning()  # it warns that non-HTTP apps have no auth level: true, and moot
    logging.getLogger().addFilter(quiet)
    try:
        functions = app.get_functions()
    finally:
        logging.getLogger().removeFilter(quiet)
    for fn in functions:
        trigger = fn.get_trigger()
        if isinstance(trigger, KafkaTrigger):  # the trigger whose binding is "kafkaTrigger"
            out[trigger.topic] = fn.get_user_function()
    return out


class KafkaTriggerInvoker(Invoker):
    provider = "azure"
    shape = "Azure Functions Kafka trigger (cardinality many)"
    limits = KAFKA_TRIGGER

    def __init__(self, app: str | func.FunctionApp):
        """`app`: the FunctionApp, or its import path `package.module:app`."""
        self.functions = kafka_trigger_functions(load_handler(app) if isinstance(app, str) else app)

    def invoke(self, batch: list[tuple[Record, CloudEvent]]) -> Outcome:
        outcome = Outcome()
        by_topic: dict[str, list[int]] = {}
        for i, (record, _) in enumerate(batch):
            by_topic.setdefault(record.topic, []).append(i)
        for topic, indices in by_topic.items():
            function = self.functions.get(topic)
            try:
                if function is None:
                    raise LookupError(f"the function app has no Kafka trigger on topic {topic!r}; "
                                      f"triggers found: {', '.join(self.functions) or 'none'}")
                function(decode_payload(trigger_payload([batch[i][0] for i in indices])))
            except Exception as exc:
                outcome.whole = True
                outcome.failed.update({i: f"function raised {type(exc).__name__}: {exc}" for i in indices})
        return outcome


def deliver_kafka_events(function: str, handle: Handler, kafka_events: list[func.KafkaEvent]) -> None:
    runtime = current(function)
    for kafka_event in kafka_events:
        headers = [(h["Key"], base64.b64decode(h["Value"])) for h in kafka_event.headers or []]
        key = kafka_event.key.encode() if kafka_event.key is not None else None
        run_handler(handle, events.decode(key, kafka_event.get_body(), headers), runtime)


def register_kafka_triggers(app: func.FunctionApp, function: str, handle: Handler) -> None:
    """One Kafka trigger function per topic that triggers `function` (a trigger takes one topic)."""
    for event_type in (t for t in contracts.catalog().values() if function in t.consumers):
        def trigger(events_: list[func.KafkaEvent]) -> None:
            deliver_kafka_events(function, handle, events_)

        name = f"{function}_{event_type.name.replace('.', '_')}"
        trigger.__name__ = name
        app.function_name(name)(app.kafka_trigger(
            arg_name="events_", topic=event_type.topic, broker_list="KafkaBrokerList",
            consumer_group=f"%SKYFUSE_CLOUD%.{function}", cardinality=func.Cardinality.MANY,
            data_type=func.DataType.STRING,
        )(trigger))
