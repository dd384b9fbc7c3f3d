"""The deployer's core: cloud-neutral, called by every cloud's entry point with a CloudEvent.

Each cloud runs its own deployer; a placement concerns it when it adds, keeps or removes that
cloud. Copying, verifying, warming and swapping the model arrive with the serving issue; today the
core accepts and records its events.
"""
from cloudevents.http import CloudEvent

from skyfuse.runtime.function import Runtime


def handle(event: CloudEvent, runtime: Runtime) -> None:
    data = event.get_data()
    involved = {p["cloud"] for p in data.get("placements", []) + data.get("previous", [])}
    runtime.received(event, "handled" if runtime.cloud in involved else "skipped: placement does not involve this cloud")
