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
the current model and the ids of the latest events handled are one snapshot in the control store
(`scheduler/state.json`), written after each event's decision was published. A restarted scheduler
resumes from it exactly, and a redelivered event (its id in the snapshot) is not counted twice.
The store, not a compacted topic or a replay of metrics.sampled: the control cloud's store is
already where run state lives and is durable in every cloud, and a replay would depend on the bus
keeping every sample since the current placement began. An event that fails leaves the state in
memory as it was, so its retry decides again from the same state.
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field, replace

import orjson
from cloudevents.http import CloudEvent

from skyfuse import contracts
from skyfuse.runtime.function import Runtime
from skyfuse.scheduling import Placement, Policy, PolicyConfig, SampleError, Sample, parse_time
from skyfuse.scheduling.clock import EventClock, Stamp, TooOld
from skyfuse.scheduling.policy import State

_lock = threading.Lock()
_schedulers: dict[str, "Scheduler"] = {}  # control cloud → its scheduler
STATE_KEY = "scheduler/state.json"
REMEMBERED_EVENTS = 1000  # ids of the latest events handled, to drop redeliveries


@dataclass
class Scheduler:
    policy: Policy
    state: State
    clock: EventClock
    model: dict | None = None
    handled: list[str] = field(default_factory=list)

    def to_data(self) -> dict:
        return {"state": self.state.to_data(), "clock": self.clock.to_data(), "model": self.model,
                "handled": self.handled[-REMEMBERED_EVENTS:]}


def _scheduler(runtime: Runtime) -> Scheduler:
    if runtime.cloud not in _schedulers:
        policy = Policy(PolicyConfig.from_fleet(runtime.fleet))
        store = runtime.store()
        if store.exists(STATE_KEY):
            saved = orjson.loads(store.get(STATE_KEY))
            scheduler = Scheduler(policy, State.from_data(saved["state"]), EventClock.from_data(saved["clock"]),
                                  saved.get("model"), list(saved.get("handled", ())))
        else:
            scheduler = Scheduler(policy, policy.new_state(), EventClock())
        _schedulers[runtime.cloud] = scheduler
    return _schedulers[runtime.cloud]


def handle(event: CloudEvent, runtime: Runtime) -> None:
    if runtime.cloud != runtime.control_cloud:
        runtime.received(event, f"skipped: the scheduler acts in the control cloud ({runtime.control_cloud})")
        return
    kind = event["type"].removeprefix(contracts.TYPE_PREFIX)
    data = event.get_data()
    with _lock:
        scheduler = _scheduler(runtime)
        if event["id"] in scheduler.handled:
            runtime.received(event, "skipped: already handled (redelivery)")
            return
        before = copy.deepcopy(scheduler)
        try:
            note = _on_event(runtime, event, kind, data, scheduler)
            scheduler.handled = [*scheduler.handled[-(REMEMBERED_EVENTS - 1):], event["id"]]
            runtime.store().put(STATE_KEY, orjson.dumps(scheduler.to_data()))
        except BaseException:
            _schedulers[runtime.cloud] = before  # the retry starts from the same state
            raise
    runtime.received(event, note)


def _on_event(runtime: Runtime, event: CloudEvent, kind: str, data: dict, scheduler: Scheduler) -> str:
    if kind == "fused.ready":
        _new_model(runtime, event, data, scheduler)
    elif kind == "metrics.sampled":
        try:
            sample = Sample.from_data(data)
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
        if state.placements and state.placed_at is None:
            state.placed_at = scheduler.clock.now  # placed before any metrics: the dwell counts from here
        decision = scheduler.policy.decide(state, scheduler.clock.now) if scheduler.model else None
        if decision:
            _announce(runtime, event, decision, scheduler.model, "metrics", stamp)
    return "handled"


def _new_model(runtime: Runtime, event: CloudEvent, data: dict, scheduler: Scheduler) -> None:
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
    _announce(runtime, event, decision, model, "model", stamp)


def _announce(runtime: Runtime, event: CloudEvent, decision, model: dict, trigger: str, stamp: Stamp) -> None:
    data = decision.to_event_data(model["version"], model["uri"], model["sha256"], model["cloud"], trigger=trigger)
    data["clock"] = stamp.to_data()
    runtime.emit("placement.changed", data, caused_by=event, dedupe_key=f"{data['decision_id']}/{event['id']}")
