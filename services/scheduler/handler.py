"""The scheduler's core: decides where the fused model is served, in the control cloud.

fused.ready: a new model; it goes where the current model is served (or, with nothing serving yet
and no latency figures, to the cheapest cloud by list price). metrics.sampled: fed to the placement
policy (`skyfuse.scheduling`) at the sample's own time, so a run can be replayed; a decision is
emitted as placement.changed with every cloud's C, P, λ and the reason. deployment.status: logged.

The policy's memory (smoothed metrics, current placement, dwell clocks) lives in this process;
the current model and placement are also kept in the control store (`scheduler/`) so a restarted
scheduler resumes serving the same model from the same clouds.
"""
from __future__ import annotations

import threading
import time

import orjson
from cloudevents.http import CloudEvent

from skyfuse import contracts
from skyfuse.runtime.function import Runtime
from skyfuse.scheduling import Placement, Policy, PolicyConfig, SampleError, format_time

_lock = threading.Lock()
_policies: dict[str, tuple[Policy, object]] = {}  # cloud → (policy, state)


def _policy(runtime: Runtime):
    if runtime.cloud not in _policies:
        policy = Policy(PolicyConfig.from_fleet(runtime.fleet))
        saved = _load(runtime, "placement")
        placements = [Placement(**p) for p in saved["placements"]] if saved else []
        _policies[runtime.cloud] = (policy, policy.new_state(placements, saved["placed_at"] if saved else None))
    return _policies[runtime.cloud]


def _load(runtime: Runtime, name: str) -> dict | None:
    store = runtime.store()
    key = f"scheduler/{name}.json"
    return orjson.loads(store.get(key)) if store.exists(key) else None


def _save(runtime: Runtime, name: str, value: dict) -> None:
    runtime.store().put(f"scheduler/{name}.json", orjson.dumps(value))


def handle(event: CloudEvent, runtime: Runtime) -> None:
    if runtime.cloud != runtime.control_cloud:
        runtime.received(event, f"skipped: the scheduler acts in the control cloud ({runtime.control_cloud})")
        return
    kind = event["type"].removeprefix(contracts.TYPE_PREFIX)
    data = event.get_data()
    with _lock:
        policy, state = _policy(runtime)
        if kind == "fused.ready":
            _new_model(runtime, event, data, policy, state)
        elif kind == "metrics.sampled":
            try:
                sample = state.observe(data)
            except SampleError as exc:
                runtime.received(event, f"skipped: unusable sample ({exc})")
                return
            model = _load(runtime, "model")
            decision = policy.decide(state, sample.t) if model else None
            if decision:
                _announce(runtime, event, decision, model, "metrics")
        runtime.received(event)


def _new_model(runtime: Runtime, event: CloudEvent, data: dict, policy: Policy, state) -> None:
    model = {"version": data["version"], "uri": data["model_uri"], "sha256": data["sha256"], "cloud": data["cloud"]}
    _save(runtime, "model", model)
    now = time.time()
    decision = policy.decide(state, now)
    if decision is None:
        serving = [p for p in state.placements if p.weight > 0]
        if not serving:  # no latency figures yet: start where serving is cheapest by list price
            prices = {name: c.price_per_hour for name, c in runtime.fleet.clouds.items()
                      if policy.config.is_allowed(name)}
            serving = [Placement(min(prices, key=prices.get), 1.0, 1)]
            reason = "initial placement: no latency figures yet, so the cloud with the lowest list price"
        else:
            reason = "new model version: keeps the current placement"
        scores, _ = policy.score(state, now)
        decision = policy._adopt(state, now, "model", tuple(serving), scores, 0.0, reason)
    _announce(runtime, event, decision, model, "model")


def _announce(runtime: Runtime, event: CloudEvent, decision, model: dict, trigger: str) -> None:
    data = decision.to_event_data(model["version"], model["uri"], model["sha256"], model["cloud"],
                                  decided_at=format_time(decision.at), trigger=trigger)
    _save(runtime, "placement", {"placements": [p.to_data() for p in decision.serving], "placed_at": decision.at})
    runtime.emit("placement.changed", data, caused_by=event)
