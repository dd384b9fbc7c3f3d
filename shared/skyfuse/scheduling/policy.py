"""The placement policy: where to serve a model version, scored as cost + λ·performance.

Pure: no I/O, no bus and no clock. The caller feeds `metrics.sampled` data into a `State`
(`state.observe(data)`) and asks `Policy.decide(state, now)` with the time `now` in epoch
seconds (normally the time of the newest event). The same inputs always give the same
decisions (see `replay`).

Scoring, for each configured cloud j, with L the observed total demand in requests/s (the sum
of every cloud's smoothed `requests_per_s` from `inference` samples; a cloud whose traffic
figure is older than `stale_after_s` counts only while it is placed, since its users still
need serving):

    replicas_j = clamp(ceil(L / capacity_rps_j), min_replicas, max_replicas_j)
    usd_j      = replicas_j · price_per_hour_j + L · 3600 · price_per_million_requests_j / 1e6
    C_j        = usd_j / min(usd_i over eligible clouds i)              (the cheapest is 1.0)

    r_j        = p99_j / slo_p99_ms                                      (1.0 at the SLO)
    u_j        = L / (replicas_j · capacity_rps_j)                       (projected utilisation)
    P_j        = r_j + slo_breach_weight · max(0, r_j - 1)               (latency, steeper past the SLO)
               + error_rate_j / error_budget                             (1.0 per error budget spent)
               + max(0, u_j - saturation_knee) / (1 - saturation_knee)   (0 below the knee, 1 when full)
               + cpu_weight · h(cpu_j) + memory_weight · h(mem_j)        (reported by the serving processes;
               + network_weight · h(net_j / network_capacity_bytes_per_s) all weights 0 by default)

    h(x)       = max(0, min(x, 1) - resource_knee) / (1 - resource_knee) (0 up to the knee, 1 when full)

    score_j    = C_j + λ · P_j                                           (lower is better)

cpu_j, mem_j and net_j are the smoothed `cpu_utilisation`, `memory_utilisation` and
`network_bytes_per_s` the monitor measures on a cloud's serving processes; a cloud that never
reported one pays nothing for it. Unlike u_j they depend on the current placement (the serving
cloud is busy, the idle ones are not), so their terms start at `resource_knee`: a cloud that is
busy but not near saturation pays nothing, and margin and dwell keep one busy window from moving
serving. With resource_knee = 0 a term is simply weight · utilisation.

Normalisation: C is relative to the cheapest eligible cloud, so it is unitless, 1.0 for the
cheapest and e.g. 1.3 for a cloud 30 % dearer; P is unitless with 1.0 meaning "p99 exactly at
the SLO". With λ = 1, 10 % more cost is worth the same as a p99 10 % of the SLO lower. Prices
are the latest reported in the samples (list prices from the config until a cloud reports);
p99 and errors are smoothed (see `metrics`). Capacity is the config's (`capacity_rps` per
replica, `max_replicas`); the `capacity_rps`/`replicas` a sample reports are not used.
Saturation uses the *projected* utilisation of the replicas the cloud would run for the whole
load, not the `load` reported, because the reported load depends on the current placement (the
serving cloud would look busy and the idle ones free, which would push traffic back and forth).

Eligibility: a cloud is eligible when it is allowed, has reported within `stale_after_s`, its
smoothed error rate is under `failover_error_rate`, it has a latency figure, and it can hold the
whole load (`max_replicas · capacity_rps ≥ L`; when no cloud can, the ones that can hold part
of it are eligible and the load is spread). A p99 above the SLO does not make a cloud
ineligible: it costs through P, so a noisy spike cannot cause a failover.

Placement: the `top_k` eligible clouds with the lowest score (ties by name), more when they
cannot hold the load together; traffic weights ∝ 1/score, capped at each cloud's capacity with
the excess poured into the others (water-filling); replicas = clamp(ceil(weight·L /
capacity_rps), min_replicas, max_replicas). The placement's value is Σ weight_j·score_j.

Changes (hysteresis):
- *initial*: the first time any cloud is eligible.
- *failover*, at once and regardless of the timers: a placed cloud is stale (down), errs at
  `failover_error_rate` or more, or is no longer allowed.
- *move*: the best placement's value beats the current one's by the relative `margin`
  (best ≤ current·(1 - margin)) at every decision for `dwell_s`, and the current placement is
  at least `min_dwell_s` old. A placement is a set of clouds; weights alone never trigger a
  change (the clouds' own load balancers follow them between decisions).
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal

from skyfuse.scheduling.metrics import RESOURCES, CloudView, MetricsState, Sample, format_time

if TYPE_CHECKING:
    from skyfuse.config import Fleet

WEIGHT_DIGITS = 4


@dataclass(frozen=True)
class CloudSpec:
    """What the fleet config says of a cloud (prices are overridden by the ones it reports)."""

    price_per_hour: float = 0.05  # USD per replica-hour
    price_per_million_requests: float = 0.2  # USD per million requests
    capacity_rps: float = 500.0  # requests/s one replica sustains within the SLO
    max_replicas: int | None = None  # None: no limit

    def __post_init__(self) -> None:
        if self.price_per_hour < 0 or self.price_per_million_requests < 0:
            raise ValueError("prices must be >= 0")
        if not self.capacity_rps > 0:
            raise ValueError("capacity_rps must be > 0")
        if self.max_replicas is not None and self.max_replicas < 0:
            raise ValueError("max_replicas must be >= 0 or None")

    def max_rps(self) -> float:
        return math.inf if self.max_replicas is None else self.max_replicas * self.capacity_rps


def fleet_clouds(fleet: Fleet | None = None) -> dict[str, CloudSpec]:
    """Cloud specs of a `skyfuse.config.Fleet` (the built-in default fleet when None)."""
    from skyfuse import config

    fleet = fleet if fleet is not None else config.Fleet()
    return {name: CloudSpec(c.price_per_hour, c.price_per_million_requests, c.capacity_rps)
            for name, c in fleet.clouds.items()}


@dataclass(frozen=True)
class PolicyConfig:
    """Every knob of the placement policy. Defaults are tuned on `bench/traces/day.jsonl`
    (see `simulate`): one-minute samples, a 100 ms p99 SLO, the default fleet's prices."""

    clouds: Mapping[str, CloudSpec] = field(default_factory=fleet_clouds)
    """Candidate clouds, in order: list prices, per-replica `capacity_rps`, `max_replicas`."""
    lambda_: float = 1.0
    """λ, weight of performance against cost: score = C + λ·P (fleet config `lambda`)."""
    slo_p99_ms: float = 100.0
    """Latency objective: the p99 a cloud should stay under; P's latency term is 1.0 there."""
    margin: float = 0.15
    """Relative improvement the best placement needs over the current one to move (0.15 = 15 %)."""
    dwell_s: float = 300.0
    """How long the better placement must stay better by `margin`, at every decision, before a move."""
    min_dwell_s: float = 900.0
    """Minimum age of a placement before any move except a failover."""
    allowed: tuple[str, ...] | None = None
    """Clouds the policy may place on; None: every cloud of `clouds`."""
    min_replicas: int = 1
    """Replicas kept in each serving cloud at least (also the floor of the cost estimate)."""
    top_k: int = 1
    """Serve from the k best clouds (more when they lack the capacity), weights ∝ 1/score."""
    stale_after_s: float = 150.0
    """A cloud with no sample for this long is down (failover when placed)."""
    half_life_s: float = 120.0
    """Half-life of the metrics smoothing, in seconds."""
    error_budget: float = 0.01
    """Error rate that costs 1.0 in P (1 % by default)."""
    failover_error_rate: float = 0.25
    """Smoothed error rate at which a cloud is ineligible, and a placed one failed over at once."""
    slo_breach_weight: float = 4.0
    """Extra P per unit of p99/SLO above 1 (a p99 10 % over the SLO adds 0.4)."""
    saturation_knee: float = 0.8
    """Projected utilisation from which saturation starts to cost (reaches 1.0 at 100 %)."""
    cpu_weight: float = 0.0
    """Weight in P of the serving processes' reported CPU utilisation past `resource_knee` (0: unused)."""
    memory_weight: float = 0.0
    """Weight in P of their reported memory utilisation past `resource_knee` (0: unused)."""
    network_weight: float = 0.0
    """Weight in P of their network throughput / `network_capacity_bytes_per_s` past `resource_knee` (0: unused)."""
    resource_knee: float = 0.8
    """Reported utilisation from which the cpu, memory and network terms start to cost (1.0 at 100 %)."""
    network_capacity_bytes_per_s: float = 125e6
    """Throughput that counts as a full network (network utilisation 1.0); 125e6 bytes/s is 1 Gbit/s."""

    def __post_init__(self) -> None:
        if not self.clouds:
            raise ValueError("at least one cloud is needed")
        object.__setattr__(self, "clouds", dict(self.clouds))
        if self.allowed is not None:
            object.__setattr__(self, "allowed", tuple(self.allowed))
            unknown = [c for c in self.allowed if c not in self.clouds]
            if unknown:
                raise ValueError(f"allowed names unknown clouds {unknown}; configured: {', '.join(self.clouds)}")
        checks = [
            (self.lambda_ >= 0, "lambda_ must be >= 0"), (self.slo_p99_ms > 0, "slo_p99_ms must be > 0"),
            (0 <= self.margin < 1, "margin must be in [0, 1)"), (self.dwell_s >= 0, "dwell_s must be >= 0"),
            (self.min_dwell_s >= 0, "min_dwell_s must be >= 0"), (self.min_replicas >= 0, "min_replicas must be >= 0"),
            (self.top_k >= 1, "top_k must be >= 1"), (self.stale_after_s > 0, "stale_after_s must be > 0"),
            (self.half_life_s > 0, "half_life_s must be > 0"), (self.error_budget > 0, "error_budget must be > 0"),
            (0 < self.failover_error_rate <= 1, "failover_error_rate must be in (0, 1]"),
            (self.slo_breach_weight >= 0, "slo_breach_weight must be >= 0"),
            (0 <= self.saturation_knee < 1, "saturation_knee must be in [0, 1)"),
            (min(self.cpu_weight, self.memory_weight, self.network_weight) >= 0,
             "cpu_weight, memory_weight and network_weight must be >= 0"),
            (0 <= self.resource_knee < 1, "resource_knee must be in [0, 1)"),
            (self.network_capacity_bytes_per_s > 0, "network_capacity_bytes_per_s must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_fleet(cls, fleet: Fleet | None = None, **overrides: Any) -> PolicyConfig:
        """From a `skyfuse.config.Fleet`: its clouds, `lambda` and every knob of its `[scheduler]`
        section; `overrides` win over them."""
        from skyfuse import config

        fleet = fleet if fleet is not None else config.Fleet()
        names = {f.name for f in fields(cls)}
        section = {k: v for k, v in config.as_dict(fleet.scheduler).items() if k in names}  # not `standby`
        return cls(clouds=fleet_clouds(fleet), **{"lambda_": fleet.lambda_, **section, **overrides})

    def is_allowed(self, cloud: str) -> bool:
        return cloud in self.clouds and (self.allowed is None or cloud in self.allowed)

    def replicas_for(self, cloud: str, rps: float) -> int:
        spec = self.clouds[cloud]
        need = math.ceil(rps / spec.capacity_rps - 1e-9) if rps > 0 else 0
        need = max(need, self.min_replicas)
        return need if spec.max_replicas is None else min(need, spec.max_replicas)

    def policy_fields(self) -> dict[str, Any]:
        """The `policy` object of placement.changed. Its `dwell_s` is documented as the minimum
        time between two changes, which is max(dwell_s, min_dwell_s) here (failovers excepted)."""
        return {"margin": self.margin, "dwell_s": max(self.dwell_s, self.min_dwell_s),
                "min_replicas": self.min_replicas}


@dataclass(frozen=True)
class Score:
    """One cloud's score at one time; `cost` is C, `performance` P, `total` C + λ·P."""

    cloud: str
    cost: float
    performance: float
    total: float
    eligible: bool
    note: str
    usd_per_hour: float  # expected cost of serving the whole load there
    replicas: int  # replicas that takes
    p99_ms: float | None
    error_rate: float
    utilisation: float  # projected
    stale: bool = False
    urgent: bool = False  # ineligible for a reason that fails a placed cloud over at once
    cpu_utilisation: float | None = None  # reported by the serving processes, smoothed; None: never
    memory_utilisation: float | None = None
    network_bytes_per_s: float | None = None
    terms: Mapping[str, float] = field(default_factory=dict, hash=False)  # P's parts: latency, errors, …


@dataclass(frozen=True)
class Placement:
    cloud: str
    weight: float
    replicas: int

    def to_data(self) -> dict[str, Any]:
        return {"cloud": self.cloud, "weight": self.weight, "replicas": self.replicas}


# the first placement, one away from a cloud that broke, one to a better cloud, or a new version
# that keeps or starts a placement
DecisionKind = Literal["initial", "failover", "move", "model"]


@dataclass(frozen=True)
class Decision:
    """A placement change, with everything it was based on."""

    at: float  # epoch seconds
    kind: DecisionKind
    lambda_: float
    demand_rps: float
    scores: tuple[Score, ...]
    placements: tuple[Placement, ...]  # new; clouds dropped from `previous` appear with weight 0, replicas 0
    previous: tuple[Placement, ...]
    reason: str
    policy: Mapping[str, Any]

    @property
    def serving(self) -> tuple[Placement, ...]:
        return tuple(p for p in self.placements if p.weight > 0)

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (replays compare these)."""
        data = asdict(self)
        data["scores"] = [asdict(s) for s in self.scores]
        data["policy"] = dict(self.policy)
        return data

    def to_event_data(self, model_version: str, model_uri: str, sha256: str, source_cloud: str,
                      decision_id: str | None = None, decided_at: str | None = None,
                      trigger: str | None = "metrics") -> dict[str, Any]:
        """`placement.changed` data. `decided_at` defaults to the decision time; `decision_id` to
        `d-<time>-<4 hex>` derived from the time, model and placement (the same on a replay)."""
        decided_at = decided_at or format_time(self.at)
        if decision_id is None:
            digest = hashlib.sha256(json.dumps(
                [self.at, model_version, [p.to_data() for p in self.placements]], sort_keys=True).encode()).hexdigest()
            stamp = format_time(math.floor(self.at)).replace("-", "").replace(":", "")
            decision_id = f"d-{stamp}-{digest[:4]}"
        scores = []
        for s in self.scores:
            entry = {"cloud": s.cloud, "cost": _num(s.cost), "performance": _num(s.performance),
                     "total": _num(s.total), "eligible": s.eligible}
            if s.note:
                entry["note"] = s.note
            scores.append(entry)
        data = {
            "decision_id": decision_id, "decided_at": decided_at, "model_version": model_version,
            "model_uri": model_uri, "sha256": sha256, "source_cloud": source_cloud,
            "placements": [p.to_data() for p in self.placements],
            "previous": [p.to_data() for p in self.previous],
            "lambda": self.lambda_, "scores": scores, "reason": self.reason, "policy": dict(self.policy),
        }
        if trigger:
            data["trigger"] = trigger
        return data


def _num(x: float) -> float:
    return round(float(x), 4)


@dataclass
class State:
    """What the policy remembers between decisions: the metrics and the current placement."""

    metrics: MetricsState
    placements: tuple[Placement, ...] = ()  # current, serving clouds only
    placed_at: float | None = None
    better_since: float | None = None  # since when a better placement has beaten the current by the margin
    decisions: int = 0

    def observe(self, item: Sample | Mapping[str, Any]) -> Sample:
        """Feed one `metrics.sampled` data object (or `Sample`)."""
        return self.metrics.observe(item)

    def observe_all(self, items: Iterable[Sample | Mapping[str, Any]]) -> None:
        self.metrics.observe_all(items)

    @property
    def clouds(self) -> tuple[str, ...]:
        return tuple(p.cloud for p in self.placements if p.weight > 0)

    def to_data(self) -> dict[str, Any]:
        """Everything the policy remembers, JSON-ready (see `from_data`)."""
        return {"metrics": self.metrics.to_data(), "placements": [p.to_data() for p in self.placements],
                "placed_at": self.placed_at, "better_since": self.better_since, "decisions": self.decisions}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> State:
        return cls(MetricsState.from_data(data["metrics"]), tuple(Placement(**p) for p in data["placements"]),
                   data.get("placed_at"), data.get("better_since"), int(data.get("decisions", 0)))


class Policy:
    """`Policy(config).decide(state, now)`: the placement change to make now, or None."""

    name = "policy"

    def __init__(self, config: PolicyConfig | None = None, name: str | None = None):
        self.config = config or PolicyConfig()
        if name:
            self.name = name

    def new_state(self, placements: Iterable[Placement] = (), placed_at: float | None = None) -> State:
        """A fresh state (optionally starting from a placement already serving)."""
        return State(MetricsState(self.config.half_life_s), tuple(p for p in placements if p.weight > 0), placed_at)

    # -- scoring ----------------------------------------------------------------------------------

    def views(self, state: State, now: float) -> dict[str, CloudView]:
        """Every reporting cloud's metrics as of `now`, by name (sorted)."""
        return {cloud: state.metrics.clouds[cloud].view(now, self.config.stale_after_s)
                for cloud in sorted(state.metrics.clouds)}

    def demand(self, state: State, now: float, views: Mapping[str, CloudView] | None = None) -> float:
        """Observed total requests/s (see the module doc); `views` as `self.views(state, now)` gives."""
        placed = set(state.clouds)
        total = 0.0
        for cloud, view in (views if views is not None else self.views(state, now)).items():
            if view.traffic_fresh or cloud in placed:
                total += view.requests_per_s
        return total

    def score(self, state: State, now: float) -> tuple[list[Score], float]:
        """Every configured cloud's score (config order) and the demand L they were scored for."""
        cfg = self.config
        views = self.views(state, now)  # once per decision: demand and every score read them
        load = self.demand(state, now, views)
        candidates = [self._candidate(cloud, views.get(cloud), load) for cloud in cfg.clouds]
        # capacity: clouds that cannot hold the whole load are eligible only when none can
        whole = [c for c in candidates if c.why is None and not c.short]
        for c in candidates:
            if c.why is None and c.short:
                share = cfg.clouds[c.cloud].max_rps() / load
                if whole:
                    c.why = f"can hold only {share:.0%} of {load:.0f} rps (max_replicas)"
                else:
                    c.part = f"can hold only {share:.0%} of {load:.0f} rps; load spread"
        eligible = [c for c in candidates if c.why is None]
        ref_pool = [c.usd for c in (eligible or candidates) if c.usd > 0]
        ref = min(ref_pool) if ref_pool else 0.0
        return [c.score(ref, cfg, load) for c in candidates], load

    def _candidate(self, cloud: str, view: CloudView | None, load: float) -> _Candidate:
        """One cloud's figures at demand `load`, and why it may not serve (None: it may)."""
        cfg, spec = self.config, self.config.clouds[cloud]
        price_h = view.price_per_hour if view and view.price_per_hour is not None else spec.price_per_hour
        price_m = (view.price_per_million_requests if view and view.price_per_million_requests is not None
                   else spec.price_per_million_requests)
        replicas = cfg.replicas_for(cloud, load)
        util = load / (replicas * spec.capacity_rps) if replicas > 0 else 0.0
        p99 = view.p99_ms if view else None
        errors = view.error_rate if view else 0.0
        ratio = p99 / cfg.slo_p99_ms if p99 is not None else 0.0
        reported = {name: getattr(view, name) if view else None for name in RESOURCES}
        terms = {"latency": ratio + cfg.slo_breach_weight * max(0.0, ratio - 1.0),
                 "errors": errors / cfg.error_budget,
                 "saturation": max(0.0, util - cfg.saturation_knee) / (1.0 - cfg.saturation_knee),
                 **self.resource_terms(reported)}
        why, urgent = None, False
        if not cfg.is_allowed(cloud):
            why, urgent = "not allowed by the policy", True
        elif view is None:
            why = "no metrics yet"
        elif view.stale:
            why, urgent = (f"no metrics for {view.age_s:.0f} s (stale after {cfg.stale_after_s:.0f} s): "
                           "treated as down"), True
        elif errors >= cfg.failover_error_rate:
            why, urgent = f"error rate {errors:.1%} at or above {cfg.failover_error_rate:.0%}", True
        elif p99 is None:
            why = "no latency measured yet"
        elif spec.max_replicas == 0:
            why = "max_replicas is 0"
        return _Candidate(cloud, usd=replicas * price_h + load * 3600.0 * price_m / 1e6, replicas=replicas,
                          util=util, p99=p99, errors=errors, terms=terms, reported=reported, why=why, urgent=urgent,
                          stale=bool(view and view.stale), short=spec.max_rps() < load)

    def resource_terms(self, reported: Mapping[str, float | None]) -> dict[str, float]:
        """The cpu, memory and network parts of P (see the module doc) for reported figures
        (None: not reported, no cost). Only the weighted ones appear."""
        cfg = self.config
        full = {"cpu_utilisation": 1.0, "memory_utilisation": 1.0,
                "network_bytes_per_s": cfg.network_capacity_bytes_per_s}
        weights = {"cpu": (cfg.cpu_weight, "cpu_utilisation"), "memory": (cfg.memory_weight, "memory_utilisation"),
                   "network": (cfg.network_weight, "network_bytes_per_s")}
        terms = {}
        for name, (weight, field_name) in weights.items():
            value = reported.get(field_name)
            if weight > 0:
                used = 0.0 if value is None else min(1.0, value / full[field_name])
                terms[name] = weight * max(0.0, used - cfg.resource_knee) / (1.0 - cfg.resource_knee)
        return terms

    # -- placements -------------------------------------------------------------------------------

    def target(self, scores: list[Score], load: float) -> tuple[Placement, ...]:
        """The best placement for these scores: top-k eligible, weights ∝ 1/score, capacity-capped."""
        cfg = self.config
        ranked = sorted((s for s in scores if s.eligible), key=lambda s: (s.total, s.cloud))
        if not ranked:
            return ()
        chosen = ranked[:cfg.top_k]
        while len(chosen) < len(ranked) and sum(cfg.clouds[s.cloud].max_rps() for s in chosen) < load:
            chosen.append(ranked[len(chosen)])
        base = {s.cloud: 1.0 / s.total if s.total > 0 else 1.0 for s in chosen}
        caps = {s.cloud: (cfg.clouds[s.cloud].max_rps() / load if load > 0 else math.inf) for s in chosen}
        weights = _water_fill(base, caps)
        weights = _round_weights(weights)
        # a cloud with traffic runs a replica at least (replicas 0 means "remove"), even with min_replicas 0
        return tuple(Placement(c, w, max(1, cfg.replicas_for(c, w * load)))
                     for c, w in sorted(weights.items(), key=lambda kv: (-kv[1], kv[0])) if w > 0)

    @staticmethod
    def value(placements: Iterable[Placement], scores: Mapping[str, Score]) -> float:
        """Σ weight·score of a placement (lower is better)."""
        return sum(p.weight * scores[p.cloud].total for p in placements if p.weight > 0)

    # -- deciding ---------------------------------------------------------------------------------

    def decide(self, state: State, now: float) -> Decision | None:
        """The placement change to make at `now`, or None to keep the current one.

        A returned decision is already adopted in `state` (it becomes the current placement)."""
        cfg = self.config
        scores, load = self.score(state, now)
        by_cloud = {s.cloud: s for s in scores}
        current = tuple(p for p in state.placements if p.weight > 0)
        best = self.target(scores, load)
        if not best:
            state.better_since = None
            return None
        if not current:
            top = by_cloud[best[0].cloud]
            reason = (f"initial placement: {_names(best)} has the best score {top.total:.3f} "
                      f"(cost {top.cost:.3f} + λ {cfg.lambda_:g} × performance {top.performance:.3f}) of "
                      f"{sum(s.eligible for s in scores)} eligible cloud(s)" + _ineligible(scores))
            return self._adopt(state, now, "initial", best, scores, load, reason)
        broken = [p.cloud for p in current if p.cloud not in by_cloud or by_cloud[p.cloud].urgent]
        if broken:
            why = ", ".join(f"{c} ({by_cloud[c].note if c in by_cloud else 'not in the fleet config'})"
                            for c in broken)
            top = by_cloud[best[0].cloud]
            reason = (f"failover from {why}; moved to {_names(best)}, the best eligible "
                      f"(score {top.total:.3f})" + _ineligible(scores, skip=broken))
            return self._adopt(state, now, "failover", best, scores, load, reason)
        if {p.cloud for p in best} == {p.cloud for p in current}:
            state.better_since = None
            return None
        now_value, best_value = self.value(current, by_cloud), self.value(best, by_cloud)
        if not best_value < now_value * (1.0 - cfg.margin):
            state.better_since = None
            return None
        if state.better_since is None:
            state.better_since = now
        if now - state.better_since < cfg.dwell_s:
            return None
        if state.placed_at is not None and now - state.placed_at < cfg.min_dwell_s:
            return None
        gain = 1.0 - best_value / now_value if now_value > 0 else 0.0
        driver = _driver(by_cloud[max(current, key=lambda p: p.weight).cloud], by_cloud[best[0].cloud], cfg.lambda_)
        reason = (f"move: {driver} (score {now_value:.3f} → {best_value:.3f}); "
                  f"{_names(best)} (score {best_value:.3f}) has beaten {_names(current)} ({now_value:.3f}) by "
                  f"{gain:.0%}, more than the {cfg.margin:.0%} margin, for {now - state.better_since:.0f} s "
                  f"(dwell {cfg.dwell_s:.0f} s)" + _ineligible(scores))
        return self._adopt(state, now, "move", best, scores, load, reason)

    def place(self, state: State, now: float, serving: tuple[Placement, ...], reason: str,
              kind: DecisionKind = "model") -> Decision:
        """Adopt `serving` at `now` for a reason outside the metrics (a new model version keeps
        or starts its placement): scored like any decision, and the dwell clocks restart."""
        scores, load = self.score(state, now)
        return self._adopt(state, now, kind, serving, scores, load, reason)

    def _adopt(self, state: State, now: float, kind: DecisionKind, best: tuple[Placement, ...], scores: list[Score],
               load: float, reason: str) -> Decision:
        previous = tuple(p for p in state.placements if p.weight > 0)
        kept = {p.cloud for p in best}
        dropped = tuple(Placement(p.cloud, 0.0, 0) for p in previous if p.cloud not in kept)
        decision = Decision(at=now, kind=kind, lambda_=self.config.lambda_, demand_rps=load, scores=tuple(scores),
                            placements=best + dropped, previous=previous, reason=reason,
                            policy=self.config.policy_fields())
        state.placements, state.placed_at, state.better_since = best, now, None
        state.decisions += 1
        return decision


@dataclass
class _Candidate:
    """A cloud on its way to a Score: its figures, and why it may not serve (None: it may)."""

    cloud: str
    usd: float  # per hour, for the whole load
    replicas: int
    util: float
    p99: float | None
    errors: float
    terms: dict[str, float]
    reported: dict[str, float | None]
    why: str | None
    urgent: bool
    stale: bool
    short: bool  # cannot hold the whole load
    part: str = ""  # holds only part of it, and no cloud holds all: the load is spread

    def score(self, ref_usd: float, cfg: PolicyConfig, load: float) -> Score:
        cost = self.usd / ref_usd if ref_usd > 0 else 1.0
        performance = sum(self.terms.values())
        if self.why is None:
            assert self.p99 is not None  # eligible clouds have a latency
            p99_text = f"p99 {self.p99:.0f} ms"
            if self.p99 > cfg.slo_p99_ms:
                p99_text += f" above the {cfg.slo_p99_ms:.0f} ms SLO"
            note = (f"{p99_text}, {self.errors:.2%} errors, {self.util:.0%} utilised by {self.replicas} "
                    f"replica(s) at {load:.0f} rps, ${self.usd:.4f}/h" + _reported_text(self.reported))
            if self.part:
                note += "; " + self.part
        else:
            note = self.why
        return Score(cloud=self.cloud, cost=cost, performance=performance, total=cost + cfg.lambda_ * performance,
                     eligible=self.why is None, note=note, usd_per_hour=self.usd, replicas=self.replicas,
                     p99_ms=self.p99, error_rate=self.errors, utilisation=self.util, stale=self.stale,
                     urgent=self.urgent, terms=self.terms, **self.reported)


def _driver(now: Score, best: Score, lambda_: float) -> str:
    """What made `best` the better cloud than `now`: the part of the score where it gains most
    (cost, or λ times one part of P), told with the figures behind it."""
    gains = {"cost": now.cost - best.cost}
    gains.update({name: lambda_ * (value - best.terms.get(name, 0.0)) for name, value in now.terms.items()})
    what = max(sorted(gains), key=lambda name: gains[name])
    a, b = now.cloud, best.cloud
    if what == "latency":
        return f"{a} p99 {_figure(now.p99_ms, '{:.3g} ms')} vs {b} {_figure(best.p99_ms, '{:.3g} ms')}"
    if what == "errors":
        return f"{a} errors {now.error_rate:.2%} vs {b} {best.error_rate:.2%}"
    if what == "saturation":
        return f"{a} {now.utilisation:.0%} utilised vs {b} {best.utilisation:.0%} at the load"
    if what in ("cpu", "memory"):
        name = f"{what}_utilisation"
        return (f"{a} {what.upper() if what == 'cpu' else what} {_figure(getattr(now, name), '{:.0%}')} vs "
                f"{b} {_figure(getattr(best, name), '{:.0%}')}")
    if what == "network":
        mb = "{:.2f} MB/s"
        return (f"{a} network {_figure(_mb(now.network_bytes_per_s), mb)} vs "
                f"{b} {_figure(_mb(best.network_bytes_per_s), mb)}")
    return f"{b} costs ${best.usd_per_hour:.4f}/h vs {a} ${now.usd_per_hour:.4f}/h"


def _figure(value: float | None, spec: str) -> str:
    return "not reported" if value is None else spec.format(value)


def _mb(value: float | None) -> float | None:
    return None if value is None else value / 1e6


def _reported_text(reported: Mapping[str, float | None]) -> str:
    """The serving processes' own figures, for a score's note (those reported)."""
    parts = []
    if (cpu := reported.get("cpu_utilisation")) is not None:
        parts.append(f"CPU {cpu:.0%}")
    if (memory := reported.get("memory_utilisation")) is not None:
        parts.append(f"memory {memory:.0%}")
    if (network := reported.get("network_bytes_per_s")) is not None:
        parts.append(f"network {network / 1e6:.2f} MB/s")
    return ", " + ", ".join(parts) if parts else ""


def _names(placements: Iterable[Placement]) -> str:
    parts = [p.cloud if p.weight >= 1 else f"{p.cloud} {p.weight:.0%}" for p in placements if p.weight > 0]
    return " + ".join(parts)


def _ineligible(scores: Iterable[Score], skip: Iterable[str] = ()) -> str:
    skip = set(skip)
    out = [f"{s.cloud} ({s.note})" for s in scores if not s.eligible and s.cloud not in skip]
    return "; not eligible: " + ", ".join(out) if out else ""


def _water_fill(base: Mapping[str, float], caps: Mapping[str, float]) -> dict[str, float]:
    """Weights ∝ `base`, none above its cap, summing to 1 when the caps allow (else ∝ caps)."""
    weights: dict[str, float] = {}
    free = dict(base)
    left = 1.0
    while free:
        total = sum(free.values())
        share = {c: left * b / total for c, b in free.items()}
        over = [c for c in sorted(free) if share[c] > caps[c]]
        if not over:
            weights.update(share)
            return weights
        for c in over:
            weights[c] = caps[c]
            left -= caps[c]
            del free[c]
        if left <= 0:
            break
    capped = sum(weights.values())
    if capped <= 0:
        return {c: 1.0 / len(base) for c in base}
    return {c: w / capped for c, w in weights.items()} | {c: 0.0 for c in free}


def _round_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Weights rounded to 4 digits that still sum to 1 (the largest takes the rounding)."""
    rounded = {c: round(w, WEIGHT_DIGITS) for c, w in weights.items()}
    if not rounded:
        return rounded
    top = max(sorted(rounded), key=lambda c: rounded[c])
    rounded[top] = round(1.0 - sum(w for c, w in rounded.items() if c != top), WEIGHT_DIGITS)
    return rounded


def greedy(config: PolicyConfig | None = None) -> Policy:
    """Baseline: the argmin of the same score at every decision (no margin, dwell or min dwell)."""
    return Policy(replace(config or PolicyConfig(), margin=0.0, dwell_s=0.0, min_dwell_s=0.0), name="greedy")


class StaticPolicy(Policy):
    """Baseline: one cloud chosen at the first decision, never moved (no failover either).

    `by="cost"`: the lowest expected cost for the load then (list prices as reported);
    `by="p99"`: the lowest smoothed p99 then."""

    def __init__(self, config: PolicyConfig | None = None, by: str = "cost"):
        if by not in ("cost", "p99"):
            raise ValueError("by must be 'cost' or 'p99'")
        super().__init__(config, name="static cheapest" if by == "cost" else "static fastest")
        self.by = by

    def decide(self, state: State, now: float) -> Decision | None:
        if state.placements:
            return None
        scores, load = self.score(state, now)
        eligible = [s for s in scores if s.eligible]
        if not eligible:
            return None
        key = (lambda s: (s.usd_per_hour, s.cloud)) if self.by == "cost" else (lambda s: (s.p99_ms, s.cloud))
        pick = min(eligible, key=key)
        best = (Placement(pick.cloud, 1.0, self.config.replicas_for(pick.cloud, load)),)
        what = f"${pick.usd_per_hour:.4f}/h" if self.by == "cost" else f"p99 {pick.p99_ms:.0f} ms"
        lowest = "cost" if self.by == "cost" else "p99"
        reason = f"{self.name}: {pick.cloud} has the lowest {lowest} ({what}), kept for good"
        return self._adopt(state, now, "initial", best, scores, load, reason)
