"""AWS Lambda's Kafka trigger (event source mapping), both sides.

Host side: the event Lambda delivers for a self-managed Apache Kafka cluster (records grouped by
`topic-partition`, base64 key and value, headers as lists of byte values), a Lambda context, and
the `batchItemFailures` response read back as Lambda reads it. Limits as Lambda's defaults for
Kafka: up to 100 records gathered for up to 500 ms, 6 MB of invocation payload.

Function side: `process_kafka_batch`, for entry points written with Powertools' BatchProcessor.
"""
from __future__ import annotations

import base64
import importlib
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.kafka_event import KafkaEventRecord
from cloudevents.http import CloudEvent

from skyfuse import events, tracing
from skyfuse.bus.base import Record
from skyfuse.runtime.clouds.base import Invoker, Limits, Outcome
from skyfuse.runtime.function import Handler, current, run_handler
from skyfuse.runtime.tracker import Lane, lane

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
    from aws_lambda_powertools.utilities.typing import LambdaContext as PowertoolsContext

LAMBDA_KAFKA = Limits(max_records=100, max_wait_s=0.5, max_bytes=6 * 1024 * 1024)


def kafka_record(record: Record) -> dict[str, Any]:
    native: dict[str, Any] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp_ms,
        "timestampType": "CREATE_TIME",
        "value": base64.b64encode(record.value or b"").decode(),
        "headers": [{name: list(value)} for name, value in record.headers],
    }
    if record.key is not None:
        native["key"] = base64.b64encode(record.key).decode()
    return native


_FIXED = len(orjson.dumps({"topic": "", "partition": 0, "offset": 0, "timestamp": 0, "timestampType": "CREATE_TIME",
                           "value": "", "headers": []})) - 3  # less the three numbers' digits
_KEY = len(',"key":""')
_UNDER_10, _UNDER_100 = bytes(range(10)), bytes(range(100))
_JSON_SIZES: dict[str, int] = {}  # topic or header name → its length as a JSON string


def native_size(record: Record) -> int:
    """`len(orjson.dumps(kafka_record(record)))`, counted without building it: the host sizes each
    record as it arrives (the payload limit) and builds the event only when it invokes."""
    value, headers = record.value or b"", record.headers
    size = (_FIXED + _json_size(record.topic) - 2 + len(str(record.partition)) + len(str(record.offset))
            + len(str(record.timestamp_ms)) + _base64_size(len(value)))
    if record.key is not None:
        size += _KEY + _base64_size(len(record.key))
    if headers:  # [{"name":[1,22,255]}, ...]: a digit per byte, one more from 10 and from 100, commas between
        values = b"".join(v for _, v in headers)
        size += (len(values) + len(values.translate(None, _UNDER_10)) + len(values.translate(None, _UNDER_100))
                 + sum(_json_size(name) + 4 + max(0, len(v) - 1) for name, v in headers) + 2 * len(headers) - 1)
    return size


def _base64_size(n: int) -> int:
    return 4 * ((n + 2) // 3)


def _json_size(text: str) -> int:
    size = _JSON_SIZES.get(text)
    if size is None:
        size = len(orjson.dumps(text))
        if len(_JSON_SIZES) < 1024:  # the few names a fleet uses, not every topic a test makes
            _JSON_SIZES[text] = size
    return size


def kafka_event(records: list[Record], bootstrap_servers: str) -> dict[str, Any]:
    """The self-managed Kafka event Lambda passes to a handler."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        grouped.setdefault(f"{record.topic}-{record.partition}", []).append(kafka_record(record))
    return {"eventSource": "SelfManagedKafka", "bootstrapServers": bootstrap_servers, "records": grouped}


@dataclass
class LambdaContext:
    """The attributes of the context object Lambda passes (what Powertools' Logger reads)."""

    function_name: str
    region: str = "us-east-1"
    memory_limit_in_mb: int = 512
    timeout_s: float = 60.0
    function_version: str = "$LATEST"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    _started: float = field(default_factory=time.monotonic)

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:{self.region}:000000000000:function:{self.function_name}"

    @property
    def log_group_name(self) -> str:
        return f"/aws/lambda/{self.function_name}"

    @property
    def log_stream_name(self) -> str:
        return f"{time.strftime('%Y/%m/%d')}/[{self.function_version}]{self.aws_request_id[:8]}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.timeout_s - (time.monotonic() - self._started)) * 1000))


def load_handler(path: str) -> Any:
    """`package.module:attribute` → the callable (for Azure: the FunctionApp) it names."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute or "lambda_handler")


class LambdaInvoker(Invoker):
    provider = "aws"
    shape = "Lambda self-managed Kafka event"
    limits = LAMBDA_KAFKA

    def __init__(self, handler_path: str, function_name: str, region: str, bootstrap_servers: str):
        self.handler = load_handler(handler_path)
        self.function_name, self.region, self.bootstrap = function_name, region, bootstrap_servers

    def cost(self, record: Record) -> int:
        return native_size(record) + 2

    def invoke(self, batch: list[tuple[Record, CloudEvent]]) -> Outcome:
        records = [record for record, _ in batch]
        event = kafka_event(records, self.bootstrap)
        try:
            response = self.handler(event, LambdaContext(self.function_name, self.region))
        except Exception as exc:
            return Outcome.all_failed(len(batch), f"Lambda handler raised {type(exc).__name__}: {exc}")
        failures = response.get("batchItemFailures") or [] if isinstance(response, dict) else []
        index = {(f"{r.topic}-{r.partition}", r.offset): i for i, r in enumerate(records)}
        outcome = Outcome()
        for failure in failures:
            ident = failure.get("itemIdentifier") if isinstance(failure, dict) else None
            key = (ident.get("partition"), ident.get("offset")) if isinstance(ident, dict) else None
            if key not in index:  # Lambda treats an unknown identifier as a failure of the whole batch
                return Outcome.all_failed(len(batch), f"batchItemFailures names no record of the batch: {failure!r}")
            outcome.failed[index[key]] = "reported in batchItemFailures"
        return outcome


class SkippedBehindFailure(Exception):
    """Not tried: an earlier record of the same partition (or key) failed in this batch."""


def process_kafka_batch(function: str, handle: Handler, event: dict[str, Any],
                        context: PowertoolsContext | None) -> PartialItemFailureResponse:
    """Run `handle` on each record of a Lambda Kafka event; report failures as `batchItemFailures`.

    Records behind a failed one in the same ordering lane are reported failed without being tried,
    so they are retried after it, in order.
    """
    runtime = current(function)
    ordering = runtime.function_settings.ordering
    failed_lanes: set[Lane] = set()

    def lane_of(record: KafkaEventRecord, key: bytes | None) -> Lane:
        return lane(ordering, record.topic, record.partition, key, record.offset)

    def handle_record(record: KafkaEventRecord) -> None:
        key = record.decoded_key
        if failed_lanes and lane_of(record, key) in failed_lanes:
            raise SkippedBehindFailure(f"{record.topic}-{record.partition}@{record.offset}")
        try:
            headers = [(name, bytes(value)) for header in record.headers for name, value in header.items()]
            run_handler(handle, events.decode(key, record.decoded_value, headers), runtime)
        except Exception:
            failed_lanes.add(lane_of(record, key))
            runtime.log.exception("record failed", extra={
                "record": f"{record.topic}-{record.partition}@{record.offset}", "cloud": runtime.cloud,
                "function": function})
            raise

    processor = BatchProcessor(event_type=EventType.Kafka, raise_on_entire_batch_failure=False)
    try:
        return process_partial_response(event=event, record_handler=handle_record, processor=processor, context=context)
    finally:
        if os.environ.get("AWS_LAMBDA_RUNTIME_API"):  # a real Lambda may freeze before the span batch goes
            tracing.flush()
