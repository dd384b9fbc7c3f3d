"""The design's worked example as one command: `skyfuse demo --scenario worked-example`.

Training half: a two-class task made by scikit-learn's `make_classification`, split at random into
three subsets of 1000 training rows, one per cloud; each sub-model starts from parameters drawn
from N(0, 1) and takes 10 steps of plain gradient descent (learning rate 0.01, the whole shard per
step); the fuser takes their weighted average with the fixed weights 0.3 / 0.3 / 0.4.

Serving half: every cloud holds the fused model (the serving one, and the others as warm
standbys); every second each cloud's monitor reports the CPU utilisation of its serving processes
and times probes to its real endpoint from outside (what a caller waits, queueing included), and
each inference server reports the requests it served and its own time per request. Prices are
equal, so the score is decided by response time. Then a load step: clients send full 1000-row
batches to the serving cloud's endpoint until its response time rises and the scheduler moves
serving, each decision with its reason.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import orjson

from skyfuse import httpclient
from skyfuse.errors import Failure
from skyfuse.payloads import MetricsSampled, PlacementChanged

if TYPE_CHECKING:
    from skyfuse.bus import Consumer
    from skyfuse.config import Fleet
    from skyfuse.dev.runs import RunContext
    from skyfuse.ml.data import Dataset
    from skyfuse.training import Plan

FULL_BATCH = 1_000_000  # at least the rows of any shard: every step sees the whole shard (gradient descent)
WEIGHTS = (0.3, 0.3, 0.4)
FEATURES = 10
LOAD_CLIENTS = 4
BASELINE_SAMPLES = 6  # probed monitor samples per cloud before the load step: the checks' big batches fade
LOAD_TIMEOUT_S = 120.0

# The scenario's timings and prices, for this process and every process the fleet starts (an
# explicit SKYFUSE_* setting in the environment wins). Equal prices leave response time to decide.
ENVIRONMENT = {
    "SKYFUSE_TRAINING__TIMER_S": "1",  # the monitor samples every second
    "INFERENCE_METRICS_S": "1",  # the inference servers report every second
    "SKYFUSE_LAMBDA": "3",  # performance (response time) weighs three times cost
    "SKYFUSE_SCHEDULER__SLO_P99_MS": "20",
    "SKYFUSE_SCHEDULER__HALF_LIFE_S": "2",
    "SKYFUSE_SCHEDULER__DWELL_S": "3",
    "SKYFUSE_SCHEDULER__MIN_DWELL_S": "5",
    "SKYFUSE_SCHEDULER__STALE_AFTER_S": "20",
    "SKYFUSE_SCHEDULER__STANDBY": "true",
}
PRICE_PER_HOUR, PRICE_PER_MILLION = "0.04", "0.2"


def prepare_environment(clouds: list[str]) -> None:
    """Set the scenario's timings and equal prices for `clouds`, unless the environment sets them."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for cloud in clouds:
        os.environ.setdefault(f"SKYFUSE_CLOUDS__{cloud.upper()}__PRICE_PER_HOUR", PRICE_PER_HOUR)
        os.environ.setdefault(f"SKYFUSE_CLOUDS__{cloud.upper()}__PRICE_PER_MILLION_REQUESTS", PRICE_PER_MILLION)


def worked_example(clouds: list[str], seed: int = 0) -> tuple[Dataset, Plan]:
    """(dataset, plan): 5000 rows → 3000 training rows in three shards of 1000, 500 validation, 1500 test."""
    import numpy as np
    from sklearn.datasets import make_classification

    from skyfuse.ml.data import Dataset
    from skyfuse.training import Plan, PlanError

    if len(clouds) < 3:
        raise PlanError(f"the worked example needs three clouds; the config has {len(clouds)} ({', '.join(clouds)})")
    clouds = clouds[:3]
    X, y = make_classification(n_samples=5000, n_features=FEATURES, n_informative=6, n_redundant=2, n_classes=2,
                               class_sep=1.0, random_state=seed)
    dataset = Dataset(X.astype(np.float32), y.astype(np.int64), [f"x{i}" for i in range(FEATURES)], [0, 1], "label",
                      "worked-example")
    plan = Plan(target="label", clouds=clouds, partition="iid", fusion="wavg", rounds=1, seed=seed,
                weights=dict(zip(clouds, WEIGHTS, strict=True)), holdout=(0.1, 0.3),
                model_options={"hidden": [], "init": "normal", "optimizer": "sgd", "learning_rate": 0.01,
                               "epochs": 10, "batch_size": FULL_BATCH, "early_stopping": False})
    return dataset, plan


# ---------------------------------------------------------------------------------- load step


class Caller:
    """Calls one endpoint's /predict in a loop on its own connection until stopped."""

    def __init__(self, url: str, body: bytes, api_key: str | None):
        self.url, self.body = url, body
        self.headers = {**httpclient.JSON_HEADERS, **({"x-api-key": api_key} if api_key else {})}
        self.answers: dict[int, int] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Caller:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)

    def _run(self) -> None:
        with httpclient.Connection(self.url, timeout_s=10) as conn:  # reconnects after a failure
            while not self.stopping.is_set():
                try:
                    status = conn.request("POST", "/predict", self.body, self.headers).status
                except httpclient.HttpError:
                    status = 0
                    self.stopping.wait(0.1)
                self.answers[status] = self.answers.get(status, 0) + 1


@dataclass
class Watch:
    """What the bus says during the load step: decisions about the served version, and every
    cloud's samples (inference: the traffic served and the server's own time; monitor: CPU and
    the probes' response time)."""

    version: str
    decisions: list[PlacementChanged] = field(default_factory=list)
    samples: list[MetricsSampled] = field(default_factory=list)

    def note(self, kind: str, data: Mapping[str, Any]) -> None:
        """`data` of an event of type `kind`, as its schema has it."""
        if kind == "placement.changed" and data["model_version"] == self.version and \
                data["decision_id"] not in {d["decision_id"] for d in self.decisions}:
            self.decisions.append(cast(PlacementChanged, data))
        elif kind == "metrics.sampled":
            self.samples.append(cast(MetricsSampled, data))

    def read(self, consumer: Consumer, fleet: Fleet) -> None:
        """Note every verified event the consumer has for us now."""
        from skyfuse import contracts, events, signing

        for record in consumer.poll(0.2, 500):
            try:
                event = events.decode(record.key, record.value, record.headers)
                signing.check(fleet, event)
            except (events.MalformedEvent, signing.Untrusted):
                continue
            # decode validated the data against its schema: a JSON object
            self.note(event["type"].removeprefix(contracts.TYPE_PREFIX), cast(dict[str, Any], event.get_data()))

    def until(self, consumer: Consumer, fleet: Fleet, done: Callable[[], bool], timeout_s: float) -> bool:
        """Read the bus until `done()` or `timeout_s`; whether `done()`."""
        deadline = time.monotonic() + timeout_s
        self.read(consumer, fleet)
        while not done() and time.monotonic() < deadline:
            self.read(consumer, fleet)
        return done()

    def serving(self) -> list[str]:
        last = self.decisions[-1] if self.decisions else None
        return [p["cloud"] for p in last["placements"] if p["weight"] > 0] if last else []

    def probed(self, cloud: str, since: str) -> list[MetricsSampled]:
        """The cloud's monitor samples since `since` whose probes were answered."""
        return [s for s in self.samples if s["cloud"] == cloud and s["source"] == "monitor"
                and s["sampled_at"] >= since and s["latency_ms"]["p99"] is not None]

    def phase(self, name: str, since: str, until: str, clouds: list[str], serving: list[str]) -> dict[str, Any]:
        """Per cloud over [since, until]: requests/s served, and the medians of the windows' p99
        as the server timed itself and as the probes waited, of CPU utilisation and probe errors."""
        figures: dict[str, dict[str, float | None]] = {}
        for cloud in clouds:
            inside = [s for s in self.samples if s["cloud"] == cloud and since <= s["sampled_at"] <= until]
            served = [s for s in inside if s["source"] == "inference" and s["requests"] > 0]
            monitored = [s for s in inside if s["source"] == "monitor"]
            figures[cloud] = {
                "requests_per_s": _mean([s["requests_per_s"] for s in served]),
                "server_p99_ms": _median([s["latency_ms"]["p99"] for s in served]),
                "probe_p99_ms": _median([s["latency_ms"]["p99"] for s in monitored]),
                "probe_error_rate": _mean([s["error_rate"] for s in monitored if s["requests"] > 0]),
                "cpu": _mean([s.get("cpu_utilisation") for s in monitored])}
        return {"name": name, "since": since, "until": until, "serving": serving, "clouds": figures}


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _median(values: Sequence[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    return known[len(known) // 2] if known else None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def load_step(ctx: RunContext) -> dict[str, Any]:
    """Take a baseline of every cloud, step the load up on the serving one until serving moves, then stop."""
    from skyfuse import contracts, training
    from skyfuse.dev import local

    fleet, console = ctx.fleet, ctx.console
    fused = ctx.progress.fused
    assert fused is not None, "the step runs once the run fused a model"
    version = fused["version"]
    watch = Watch(version)
    for decision in ctx.progress.decisions:
        watch.note("placement.changed", decision)
    clouds = list(ctx.endpoints)
    key = local.api_key(fleet)
    batch = ctx.prepared.test.X[:1000]
    full_batch = orjson.dumps({"instances": batch.tolist(), "format": "compact"})
    topics = [contracts.event_type(t).topic for t in ("placement.changed", "metrics.sampled")]
    console.print(f"waiting for every cloud to hold {version} (the placed one serving, the others as standbys)…")
    missing = [c for c in clouds if not training.serves(ctx.endpoints[c], version, 60)]
    consumer = ctx.bus.consumer(f"cli.{ctx.prepared.plan.run_id}.scenario", topics)
    load: list[Caller] = []
    phases: list[dict[str, Any]] = []
    moved: dict[str, Any] | None = None
    error: str | None = None
    load_answers: dict[str, int] = {}
    try:
        if missing:
            raise ScenarioError(f"{', '.join(missing)} never loaded {version}; is scheduler.standby on?")
        started = _now()
        console.print(f"baseline: {BASELINE_SAMPLES} response-time samples from every cloud's monitor…")
        baseline = watch.until(consumer, fleet, lambda: bool(watch.serving()) and all(
            len(watch.probed(c, started)) >= BASELINE_SAMPLES for c in clouds), 90)
        if not baseline:
            raise ScenarioError("no response-time samples from every cloud within 90 s: "
                                + ", ".join(f"{c} {len(watch.probed(c, started))}" for c in clouds))
        target = watch.serving()[0]
        step = _now()
        phases.append(watch.phase("baseline", started, step, clouds, watch.serving()))
        console.print(f"load step: {LOAD_CLIENTS} clients sending {len(batch)}-row batches to {target} "
                      f"({ctx.endpoints[target]}) until serving moves…")
        load = [Caller(ctx.endpoints[target], full_batch, key).start() for _ in range(LOAD_CLIENTS)]
        watch.until(consumer, fleet, lambda: target not in watch.serving(), LOAD_TIMEOUT_S)
        moved_at = _now()
        phases.append(watch.phase(f"load on {target}", step, moved_at, clouds, [target]))
        if target in watch.serving():
            raise ScenarioError(f"serving stayed on {target} for {LOAD_TIMEOUT_S:g} s of load")
        moved = {"from": target, "to": watch.serving(), "reason": watch.decisions[-1]["reason"]}
        console.print(f"moved: {target} → {', '.join(watch.serving())}: {watch.decisions[-1]['reason']}",
                      highlight=False)
        for caller in load:
            caller.stop()
            for status, n in caller.answers.items():
                load_answers[str(status)] = load_answers.get(str(status), 0) + n
        load = []
        stopped = _now()
        watch.until(consumer, fleet, lambda: all(len(watch.probed(c, stopped)) >= 3 for c in clouds), 30)
        # from a second after the load stopped: the 1 s windows ending then saw none of it
        times = [sorted(s["sampled_at"] for s in watch.probed(c, stopped)) for c in clouds]
        settled = max((t[1] for t in times if len(t) > 1), default=stopped)
        phases.append(watch.phase("after the move, load stopped", settled, _now(), clouds, watch.serving()))
    except ScenarioError as exc:
        error = str(exc)
        console.print(f"[bold red]{error}[/]", highlight=False)
    finally:
        for caller in load:
            caller.stop()
        consumer.close()
    return {"placements": [training.decision(d) for d in watch.decisions], "load_phases": phases,
            "scenario": {"name": "worked-example", "moved": moved, "error": error,
                         "load_answers": load_answers}}


class ScenarioError(Failure, RuntimeError):
    """The scenario could not show what it is for; the message says what was missing."""
