"""The scheduler's core: cloud-neutral, called by every cloud's entry point with a CloudEvent.

It places serving where cost + λ·performance is lowest (fused.ready, metrics.sampled, deployment.status). The logic arrives with its issue; today the core accepts and records its events.
"""
from cloudevents.http import CloudEvent

from skyfuse.runtime.function import Runtime


def handle(event: CloudEvent, runtime: Runtime) -> None:
    runtime.received(event)
