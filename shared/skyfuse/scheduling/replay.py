"""Replaying a metrics trace through a policy, and checking recorded decisions against it.

A replay feeds the samples in `sampled_at` order (samples with the same time in their given
order) and asks for a decision once per distinct `sampled_at`, after all its samples: the same
trace and config always give the same decisions, field for field.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import groupby
from typing import Any

from skyfuse.scheduling.metrics import Sample, as_sample, format_time
from skyfuse.scheduling.policy import Decision, Policy, PolicyConfig


def replay(trace: Iterable[Sample | Mapping[str, Any]],
           policy: Policy | PolicyConfig | None = None) -> list[Decision]:
    """Every decision a fresh `policy` (or `Policy(config)`) takes over `trace`."""
    policy = policy if isinstance(policy, Policy) else Policy(policy)
    state = policy.new_state()
    samples = sorted((as_sample(item) for item in trace), key=lambda s: s.t)
    decisions = []
    for t, group in groupby(samples, key=lambda s: s.t):
        state.observe_all(group)
        decision = policy.decide(state, t)
        if decision is not None:
            decisions.append(decision)
    return decisions


def _key(item: Decision | Mapping[str, Any]) -> tuple[str, tuple[tuple[str, float, int], ...]]:
    """(decided_at, sorted (cloud, weight, replicas)): what two decisions must share to agree."""
    if isinstance(item, Decision):
        at, placements = format_time(item.at), [p.to_data() for p in item.placements]
    else:  # placement.changed data
        at, placements = item["decided_at"], item["placements"]
    return at, tuple(sorted((p["cloud"], round(float(p["weight"]), 4), int(p["replicas"])) for p in placements))


def differences(recorded: Iterable[Decision | Mapping[str, Any]],
                replayed: Iterable[Decision | Mapping[str, Any]]) -> list[str]:
    """How two decision lists (Decisions or placement.changed data) differ in time and placement;
    empty when they agree."""
    left, right = [_key(d) for d in recorded], [_key(d) for d in replayed]
    out = []
    for i, (a, b) in enumerate(zip(left, right, strict=False)):  # a length mismatch is reported below
        if a != b:
            out.append(f"decision {i}: recorded {a[0]} {list(a[1])}, replayed {b[0]} {list(b[1])}")
    if len(left) != len(right):
        out.append(f"{len(left)} decisions recorded, {len(right)} replayed")
    return out
