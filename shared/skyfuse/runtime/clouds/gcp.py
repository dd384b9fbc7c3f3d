"""Google Cloud functions: a CloudEvent to a functions-framework `cloud_event` function, both sides.

Host side: the function's module is loaded by functions-framework's own `create_app`, and each
event is POSTed to that app in binary content mode (`ce-*` headers), as Eventarc's Kafka source
delivers records that already are CloudEvents. One event per request, in order; a non-2xx answer
fails it, and the rest of the batch goes again later.

Function side: `deliver_cloud_event`, called from the decorated function with what the framework
parsed.
"""
from __future__ import annotations

import re
import sys

import functions_framework
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

from skyfuse import contracts
from skyfuse.bus.base import Record
from skyfuse.runtime.clouds.base import Invoker, Limits, Outcome
from skyfuse.runtime.function import Handler, current, run_handler

# One HTTP request per event; a host step sends up to 100 of them, one after another.
CLOUD_RUN_EVENT = Limits(max_records=100, max_wait_s=0.0, max_bytes=32 * 1024 * 1024)


class CloudEventInvoker(Invoker):
    provider = "gcp"
    shape = "CloudEvent over HTTP (binary mode)"
    limits = CLOUD_RUN_EVENT

    def __init__(self, source: str, target: str):
        # create_app appends the source's folder to sys.path; there, the function's Azure entry
        # point (azure.py) would shadow the `azure` namespace package for the whole process, so put
        # sys.path back.
        saved = list(sys.path)
        try:
            self.app = functions_framework.create_app(  # type: ignore[no-untyped-call]  # unannotated upstream
                target=target, source=source, signature_type="cloudevent")
        finally:
            sys.path[:] = saved
        self.client = self.app.test_client()

    def invoke(self, batch: list[tuple[Record, CloudEvent]]) -> Outcome:
        outcome = Outcome()
        for i, (_, event) in enumerate(batch):
            headers, body = to_binary(event)
            response = self.client.post("/", headers=headers, data=body)
            if response.status_code >= 300:
                outcome.failed[i] = f"HTTP {response.status_code}: {_text(response.get_data(as_text=True))}"
                if 400 <= response.status_code < 500 and response.status_code not in RETRYABLE:
                    outcome.permanent.add(i)  # the function refused the request itself: a retry gets the same
                outcome.untried = set(range(i + 1, len(batch)))  # keep every lane's order: stop here
                break
        return outcome


RETRYABLE = {408, 409, 425, 429}  # client errors that mean "not now" rather than "never"


def _text(body: str, limit: int = 300) -> str:
    """An error body as one line of plain text (functions-framework answers some errors in HTML)."""
    return " ".join(re.sub(r"<[^>]+>", " ", body).split())[:limit]


def deliver_cloud_event(function: str, handle: Handler, cloud_event: CloudEvent) -> None:
    """Validate what functions-framework parsed, then run the handler core."""
    contracts.validate(cloud_event["type"], cloud_event.get_data())
    run_handler(handle, cloud_event, current(function))
