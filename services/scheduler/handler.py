"""The scheduler's core: decides where the fused model is served, in the control cloud.

fused.ready: a new model; it goes where the current model is served (or, with nothing serving yet
and no latency figures, to the cheapest cloud by list price). metrics.sampled: fed to the placement
policy (`skyfuse.scheduling`); a decision is emitted as placement.changed with every cloud's C, P,
λ, the reason, and the time it was taken at. deployment.status: logged.

Time: every decision is taken at the scheduler's event clock (`skyfuse.scheduling.clock`), which
the samples' own `sampled_at` move within stated bounds; the wall clock is never read, so a
replayed backlog decides as it did live, and a fast or slow clock in one cloud cannot freeze or
fast-forward the dwell timers.

State: the policy's memory (smoothed metrics, current placement, dwell clocks), the event clock,
the current model, the ids of the latest events handled and an outbox of decisions to publish
are one snapshot in the control store, written as a numbered sequence
(`scheduler/state/<n>.json`). Each event's snapshot n+1 is created with create-if-absent, so when
two scheduler instances share the work (two members of the group, or a rebalance) only one of
them advances the state; the other reloads and handles its event again on the new state. The
decision goes into the snapshot's outbox first and is published after (transactional outbox): a
crash or a failed publish in between is repaired by whichever instance handles the next event,
and the decision's id is derived from it, so a second publish is a redelivery. A restarted
scheduler resumes exactly; a redelivered event (its id in the snapshot) is dropped. The store,
not a compacted topic or a replay of metrics.sampled: it is already where run state lives, it is
durable in every cloud, and its create-if-absent gives the single writer a replay cannot.
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field, replace
from typing import Any, cast

import orjson
from cloudevents.http import CloudEvent

from skyfuse import contracts
from skyfuse.payloads import DeploymentStatus, FusedReady, MetricsSampled
from skyfuse.runtime.function import Runtime
from skyfuse.runtime.idempotency import InProgress
from skyfuse.scheduling import Placement, Policy, PolicyConfig, Sample, SampleError, parse_time
from skyfuse.scheduling.clock import EventClock, Stamp, TooOld
from skyfuse.scheduling.policy import Decision, State

_lock = threading.Lock()
_schedulers: dict[str, Scheduler] = {}  # control cloud → the latest snapshot this process knows
STATE_DIR = "scheduler/state/"
KEEP_SNAPSHOTS = 5
REMEMBERED_EVENTS = 1000  # ids of the latest events handled, to drop redeliveries
Consumed = FusedReady | MetricsSampled | DeploymentStatus  # the data of the events it handles


@dataclass
class Scheduler:
    policy: Policy
    state: State
    clock: EventClock
    model: dict[str, str] | None = None  # version, uri, sha256, cloud
    handled: list[str] = field(default_factory=list)
    outbox: list[dict[str, Any]] = field(default_factory=list)  # placement.changed data and dedupe key, to publish
    seq: int = 0

    def to_data(self) -> dict[str, Any]:
        return {"seq": self.seq, "state": self.state.to_data(), "clock": self.clock.to_data(), "model": self.model,
                "handled": self.handled[-REMEMBERED_EVENTS:], "outbox": self.outbox}


def _snapshot_key(seq: int) -> str:
    return f"{STATE_DIR}{seq:012d}.json"


def _scheduler(runtime: Runtime) -> Scheduler:
    """The latest snapshot: this process's own when no other instance has written since."""
    store = runtime.store()
    names = store.list(STATE_DIR)
    seq = int(names[-1].rsplit("/", 1)[1].removesuffix(".json")) if names else 0
    cached = _schedulers.get(runtime.cloud)
    if cached is not None and cached.seq == seq:
        return cached
    policy = Policy(PolicyConfig.from_fleet(runtime.fleet))
    if seq:
        saved = orjson.loads(store.get(_snapshot_key(seq)))
        scheduler = Scheduler(policy, State.from_data(saved["state"]), EventClock.from_data(saved["clock"]),
                              saved.get("model"), list(saved.get("handled", ())), list(saved.get("outbox", ())), seq)
    else:
        scheduler = Scheduler(policy, policy.new_state(), EventClock())
    _schedulers[runtime.cloud] = scheduler
    return scheduler


def handle(event: CloudEvent, runtime: Runtime) -> None:
    if runtime.cloud != runtime.control_cloud:
        runtime.received(event, f"skipped: the scheduler acts in the control cloud ({runtime.control_cloud})")
        return
    kind = event["type"].removeprefix(contracts.TYPE_PREFIX)
    data = cast(Consumed, event.get_data())
    with _lock:
        current = _scheduler(runtime)
        _flush(runtime, current)  # what the last snapshot decided is published before anything else
        if event["id"] in current.handled:
            runtime.received(event, "skipped: already handled (redelivery)")
            return
        work = copy.deepcopy(current)  # the event works on a copy: a failure leaves `current` as it was
        work.seq += 1
        note = _on_event(runtime, event, kind, data, work)
        work.handled = [*work.handled[-(REMEMBERED_EVENTS - 1):], event["id"]]
        store = runtime.store()
        if not store.create(_snapshot_key(work.seq), orjson.dumps(work.to_data())):
            _schedulers.pop(runtime.cloud, None)
            raise InProgress(f"another scheduler instance wrote state {work.seq} first; this event is handled "
                             "again on it", retry_after_s=0.05)
        _schedulers[runtime.cloud] = work
        for old in store.list(STATE_DIR)[:-KEEP_SNAPSHOTS]:
            store.delete(old)
        _flush(runtime, work)
    runtime.received(event, note)


def _flush(runtime: Runtime, scheduler: Scheduler) -> None:
    """Publish the outbox (ids derived from each decision: a repeat is a redelivery)."""
    for item in scheduler.outbox:
        runtime.emit("placement.changed", item["data"], dedupe_key=item["key"], traceparent=item.get("traceparent"))
    scheduler.outbox = []


def _on_event(runtime: Runtime, event: CloudEvent, kind: str, data: Consumed, scheduler: Scheduler) -> str:
    if kind == "fused.ready":
        _new_model(runtime, event, cast(FusedReady, data), scheduler)
    elif kind == "metrics.sampled":
        try:
            sample = Sample.from_data(cast(MetricsSampled, data))
        except SampleError as exc:
            return f"skipped: unusable sample ({exc})"
        if sample.cloud not in runtime.fleet.clouds:
            return (f"skipped: sample from cloud {sample.cloud!r}, which is not configured "
                    f"(configured: {', '.join(runtime.fleet.clouds)})")
        try:
            stamp = scheduler.clock.accept(sample.cloud, sample.t)
        except TooOld as exc:
            return f"skipped: {exc}"
        state = scheduler.state
        state.observe(replace(sample, t=stamp.at))
        now = scheduler.clock.now
        assert now is not None  # accept() has set the clock
        if state.placements and state.placed_at is None:
            state.placed_at = now  # placed before any metrics: the dwell counts from here
        if scheduler.model:
            decision = scheduler.policy.decide(state, now)
            if decision:
                _announce(scheduler, event, decision, scheduler.model, "metrics", stamp)
    return "handled"


def _new_model(runtime: Runtime, event: CloudEvent, data: FusedReady, scheduler: Scheduler) -> None:
    model = {"version": data["version"], "uri": data["model_uri"], "sha256": data["sha256"], "cloud": data["cloud"]}
    scheduler.model = model
    policy, state = scheduler.policy, scheduler.state
    stamp = scheduler.clock.stamp(parse_time(event["time"]))
    decision = policy.decide(state, stamp.at)
    if decision is None:
        serving = tuple(p for p in state.placements if p.weight > 0)
        if not serving:  # no latency figures yet: start where serving is cheapest by list price
            prices = {name: c.price_per_hour for name, c in runtime.fleet.clouds.items()
                      if policy.config.is_allowed(name)}
            serving = (Placement(min(prices, key=prices.__getitem__), 1.0, 1),)
            reason = "initial placement: no latency figures yet, so the cloud with the lowest list price"
        else:
            reason = "new model version: keeps the current placement"
        decision = policy.place(state, stamp.at, serving, reason)
    if scheduler.clock.now is None:
        state.placed_at = None  # no metrics yet: the dwell clocks start with the first sample
    _announce(scheduler, event, decision, model, "model", stamp)


def _announce(scheduler: Scheduler, event: CloudEvent, decision: Decision, model: dict[str, str], trigger: str,
              stamp: Stamp) -> None:
    data = decision.to_event_data(model["version"], model["uri"], model["sha256"], model["cloud"], trigger=trigger)
    data["clock"] = stamp.to_data()
    data["sequence"] = scheduler.seq  # the snapshot that records this decision
    scheduler.outbox.append({"data": data, "key": f"{data['decision_id']}/{event['id']}",
                             "traceparent": event.get("traceparent")})
