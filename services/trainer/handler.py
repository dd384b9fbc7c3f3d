"""The trainer's core: cloud-neutral, called by every cloud's entry point with a CloudEvent.

Each cloud runs its own trainer; it acts only on shards that live in its cloud. Training itself
(a Keras model on the shard, then model.ready) arrives with the training issue; today the core
accepts and records its events.
"""
from cloudevents.http import CloudEvent

from skyfuse.runtime.function import Runtime


def handle(event: CloudEvent, runtime: Runtime) -> None:
    data = event.get_data()
    clouds = data.get("clouds") or [data.get("cloud")]
    if runtime.cloud not in clouds:
        runtime.received(event, "skipped: the shard lives in another cloud")
        return
    runtime.received(event)
