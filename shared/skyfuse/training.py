"""A training run from the user's side: split the data, place each shard in its cloud's store,
publish shard.ready, follow the run's events to fused.ready, then score everything on the test rows.

The test split never leaves this process: it is used for neither training nor choosing (the fuser
chooses on the validation split), so the figures reported here are honest.
"""
from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import orjson
from cloudevents.http import CloudEvent

from skyfuse import contracts, events, httpclient, signing, tracing
from skyfuse.bus import Bus, Record
from skyfuse.config import Fleet, as_dict
from skyfuse.errors import InvalidInput
from skyfuse.payloads import (
    DeploymentState,
    DeploymentStatus,
    FusedMember,
    FusedReady,
    OnnxReady,
    PlacementChanged,
    ShardReady,
)
from skyfuse.runtime import deadletter
from skyfuse.storage import fetch, keys, open_store

if TYPE_CHECKING:  # numpy and the ML modules load when a run needs them, not with the CLI
    import numpy as np

    from skyfuse.ml.data import Dataset

RUNS_DIR = Path(".skyfuse/runs")
MAX_ROWS = 1000  # rows per inference request (skyfuse.serving.api.MAX_ROWS)
FOLLOWED = ["model.ready", "onnx.ready", "round.started", "fused.ready", "placement.changed", "deployment.status"]
FAILURES = ["trainer", "exporter", "fuser", "scheduler", "deployer"]


class PlanError(InvalidInput):
    """A training option that cannot work (clouds, weights, --model, --init); the message names it."""


@dataclass
class Plan:
    target: str
    clouds: list[str]
    partition: str = "iid"
    alpha: float = 0.5
    fusion: str = "auto"
    rounds: int = 1
    seed: int = 0
    init: str | None = None  # a .keras file to start every trainer from
    timeout_s: float | None = None  # quorum timeout; default from the fleet config
    run_id: str = field(default_factory=lambda: f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")
    weights: dict[str, float] | None = None  # fusion weight per cloud (normalised); None: by rows
    shards_per_cloud: int = 1
    holdout: tuple[float, float] = (0.15, 0.2)  # validation and test fractions of the whole dataset
    model_options: dict[str, Any] = field(default_factory=dict)  # ModelSpec keys over the fleet's training defaults
    model: str | None = None  # a user's Keras model instead of the MLP: PATH.keras or MODULE:FUNCTION

    @property
    def shard_clouds(self) -> list[str]:
        """The cloud of each shard: every cloud gets `shards_per_cloud` shards, dealt in turn."""
        return [self.clouds[i % len(self.clouds)] for i in range(len(self.clouds) * self.shards_per_cloud)]


@dataclass
class Prepared:
    plan: Plan
    train: Dataset
    validation: Dataset
    test: Dataset
    shards: list[tuple[str, Dataset]]  # (cloud, its shard)
    shard_events: list[CloudEvent]  # signed, when signing is on
    seconds: float
    fleet: Fleet


def prepare(fleet: Fleet, dataset: Dataset, plan: Plan) -> Prepared:
    """Split, partition, upload; returns the shard.ready events, not yet published."""
    import numpy as np

    from skyfuse.ml import data as mldata

    started = time.monotonic()
    unknown = [c for c in plan.clouds if c not in fleet.clouds]
    if unknown:
        raise PlanError(f"--clouds names {', '.join(unknown)}, not configured; "
                        f"configured clouds: {', '.join(fleet.clouds)}")
    if plan.weights is not None:
        check_weights(plan.weights, plan.clouds)
    train, validation, test = mldata.split(dataset, *plan.holdout, seed=plan.seed)
    parts = mldata.partition(train, len(plan.shard_clouds), plan.partition, seed=plan.seed, alpha=plan.alpha)
    control = open_store(fleet.clouds[fleet.control_cloud or next(iter(fleet.clouds))].store)
    task = "binary" if len(dataset.classes) == 2 else "multiclass"
    control.put(keys.run_info(plan.run_id), orjson.dumps({
        "target": dataset.target, "classes": dataset.classes, "features": dataset.features, "task": task}))
    control.put(keys.validation(plan.run_id), mldata.to_csv_bytes(validation))
    mean, variance = mldata.pooled_stats([(p.X.mean(0), p.X.var(0), len(p)) for p in parts])
    settings = fleet.training
    model: dict[str, Any] = {"hidden": settings.hidden, "epochs": settings.epochs, "batch_size": settings.batch_size,
                             "learning_rate": settings.learning_rate, "seed": plan.seed,
                             "finetune_epochs": settings.finetune_epochs,
                             "standardization": {"mean": np.asarray(mean).tolist(),
                                                 "variance": np.asarray(variance).tolist()},
                             **plan.model_options}
    if plan.model:  # every trainer starts from this one model (its weights included): FedAvg can average them
        saved = control.put(keys.model_template(plan.run_id),
                            user_template(plan, dataset.n_features, len(dataset.classes), train.X[:256]))
        model.update(template_uri=saved.uri, template_sha256=saved.sha256)
        del model["standardization"]  # the user's model takes raw features
    elif plan.init:
        raw = Path(plan.init).read_bytes()
        saved = control.put(keys.init_model(plan.run_id), raw)
        model.update(init_uri=saved.uri, init_sha256=saved.sha256)
    manifest: dict[str, Any] = {"expected_members": len(parts), "clouds": plan.clouds, "quorum": len(parts) // 2 + 1,
                                "timeout_s": plan.timeout_s or settings.quorum_timeout_s, "fusion": plan.fusion,
                                "rounds": plan.rounds}
    if plan.weights is not None:
        total = sum(plan.weights.values())
        manifest["weights"] = {c: plan.weights[c] / total for c in plan.clouds}
    shard_events = []
    signer = signing.signer_for(fleet, signing.CLI)
    for i, (cloud, part) in enumerate(zip(plan.shard_clouds, parts, strict=True)):  # one part per shard
        saved = open_store(fleet.clouds[cloud].store).put(keys.shard(plan.run_id, str(i)), mldata.to_csv_bytes(part))
        shard_events.append(events.new_event("shard.ready", {
            "run_id": plan.run_id, "round": 0, "shard_id": str(i), "cloud": cloud, "uri": saved.uri,
            "sha256": saved.sha256, "bytes": saved.size, "rows": len(part), "features": dataset.features,
            "target": dataset.target, "task": task, "classes": dataset.classes, "partition": plan.partition,
            "manifest": manifest, "model": model,
        }, source=signing.source_of(signing.CLI), subject=cloud))
        if signer:
            signer.sign(shard_events[-1])
    return Prepared(plan, train, validation, test, list(zip(plan.shard_clouds, parts, strict=True)), shard_events,
                    time.monotonic() - started, fleet)


def user_template(plan: Plan, n_features: int, n_classes: int, sample: np.ndarray) -> bytes:
    """The .keras bytes of the user's model `plan.model` (with `plan.init`'s weights, if given),
    checked here, before any shard is sent: it fits the task (`check_user_model`) and exports to
    ONNX. PlanError naming the option and what is wrong."""
    from skyfuse.ml import export
    from skyfuse.ml import model as mlmodel

    assert plan.model, "user_template is called for a plan with --model"
    try:
        model = mlmodel.load_user_model(plan.model, seed=plan.seed)
        mlmodel.check_user_model(model, n_features, n_classes, sample)
    except mlmodel.UserModelError as exc:
        raise PlanError(f"--model {plan.model}: {exc}") from None
    if plan.init:
        theirs, mine = mlmodel.load(plan.init).get_weights(), model.get_weights()
        if [w.shape for w in theirs] != [w.shape for w in mine]:
            raise PlanError(f"--init {plan.init}: its weights {[w.shape for w in theirs]} do not fit --model "
                            f"{plan.model} ({[w.shape for w in mine]})")
        model.set_weights(theirs)
    try:
        export.to_onnx(model)
    except Exception as exc:  # noqa: BLE001 - tf2onnx raises many kinds for what it cannot convert
        raise PlanError(f"--model {plan.model}: it cannot be converted to ONNX, as every trained model must be "
                        f"({type(exc).__name__}: {exc})") from None
    return mlmodel.to_bytes(model)


def parse_weights(text: str) -> dict[str, float]:
    """`aws=0.3,gcp=0.3,azure=0.4` → {cloud: weight}; PlanError saying what is wrong."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        cloud, eq, value = item.partition("=")
        try:
            weight = float(value) if eq else None
        except ValueError:
            weight = None
        if not cloud.strip() or weight is None or weight != weight:
            raise PlanError(f"--weights {text!r}: {item!r} is not CLOUD=NUMBER (e.g. aws=0.3,gcp=0.3,azure=0.4)")
        if cloud.strip() in weights:
            raise PlanError(f"--weights {text!r}: {cloud.strip()} is given twice")
        weights[cloud.strip()] = weight
    if not weights:
        raise PlanError("--weights is empty; give CLOUD=NUMBER for every cloud, e.g. aws=0.3,gcp=0.3,azure=0.4")
    return weights


def check_weights(weights: dict[str, float], clouds: list[str]) -> None:
    """One finite, non-negative weight per cloud of the run, not all zero."""
    extra, missing = sorted(set(weights) - set(clouds)), [c for c in clouds if c not in weights]
    if extra or missing:
        raise PlanError("--weights must name exactly the run's clouds (" + ", ".join(clouds) + ")"
                        + (f"; not in the run: {', '.join(extra)}" if extra else "")
                        + (f"; missing: {', '.join(missing)}" if missing else ""))
    bad = {c: w for c, w in weights.items() if not (0 <= w < float("inf"))}
    if bad:
        raise PlanError(f"--weights must be finite and >= 0; got {bad}")
    if sum(weights.values()) <= 0:
        raise PlanError("--weights are all 0: at least one cloud needs a positive weight")


@dataclass
class Progress:
    """What the follower has seen of one run."""

    shards: int
    rounds: int
    trained: dict[int, int] = field(default_factory=dict)  # round → model.ready count
    exported: dict[int, int] = field(default_factory=dict)
    members: dict[tuple[int, str], OnnxReady] = field(default_factory=dict)  # (round, shard) → onnx.ready data
    failures: list[dict[str, Any]] = field(default_factory=list)
    fused: FusedReady | None = None
    placements: dict[str, PlacementChanged] = field(default_factory=dict)  # model version → its last decision
    decisions: list[PlacementChanged] = field(default_factory=list)  # every verified placement.changed, in order
    # version → cloud → deployment.status
    statuses: dict[str, dict[str, DeploymentStatus]] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)  # milestone → seconds since start

    @property
    def placement(self) -> PlacementChanged | None:
        return self.placements.get(self.fused["version"]) if self.fused else None

    @property
    def deployments(self) -> dict[str, DeploymentStatus]:
        return self.statuses.get(self.fused["version"], {}) if self.fused else {}

    @property
    def placed(self) -> list[str]:
        placement = self.placement
        return [p["cloud"] for p in placement["placements"] if p["weight"] > 0] if placement else []

    def state(self, cloud: str) -> DeploymentState | None:
        """The fused version's deployment state in `cloud`; None before its first deployment.status."""
        status = self.deployments.get(cloud)
        return status["state"] if status else None

    @property
    def deployed(self) -> bool:
        """Every placed cloud serves the fused version, or one has failed to."""
        states = [self.state(c) for c in self.placed]
        return bool(states) and (all(s == "serving" for s in states) or "failed" in states)

    @property
    def serving(self) -> int:
        """How many placed clouds serve the fused version."""
        return sum(self.state(c) == "serving" for c in self.placed)

    @property
    def rounds_fused(self) -> int:
        """Rounds done: one for each round started after the first, and the last when fused.ready came."""
        return sum(1 for k in self.times if k.startswith("round.")) + (self.fused is not None)

    def stage_seconds(self, prepare_s: float, centralized_s: float) -> dict[str, float | None]:
        """Seconds from the start of the run to each stage (the summary's `timings`)."""
        t = self.times
        return {"prepare_s": prepare_s, "train_s": t.get("trained.0.last"), "export_s": t.get("exported.0.last"),
                "fusion_s": t.get("fused"), "fedavg_rounds_s": (t["fused"] - t["round.1"]) if "round.1" in t else 0.0,
                "centralized_train_s": centralized_s, "serving_s": t.get("serving")}


def follow(bus: Bus, prepared: Prepared, on_change: Callable[[Progress], None], timeout_s: float = 900,
           until_served: bool = False) -> Progress:
    """Publish the shard events, then read the run's events until fused.ready (or, with
    `until_served`, until every placed cloud serves it), or give up."""
    plan = prepared.plan
    progress = Progress(len(prepared.shard_events), plan.rounds)
    topics = [contracts.event_type(t).topic for t in FOLLOWED] + [contracts.dlq_topic(f) for f in FAILURES]
    bus.ensure_topics(topics)
    started = time.monotonic()
    with bus.consumer(f"cli.{plan.run_id}", topics) as consumer:
        # one run, one trace: the shard events are published under one root span
        with tracing.root(f"cli train {plan.run_id}", prepared.fleet, {"skyfuse.run_id": plan.run_id}):
            for event in prepared.shard_events:
                with tracing.producing(event, prepared.fleet, "cli", event.get("subject")):
                    key, value, headers = events.encode(event)
                    bus.publish(events.topic_of(event), value, key, headers)
        while time.monotonic() - started < timeout_s and not (
                progress.fused and (not until_served or progress.deployed)):
            for record in consumer.poll(0.2, 100):
                _note(prepared.fleet, record, plan.run_id, progress, time.monotonic() - started)
            on_change(progress)
            if len({f["shard_id"] for f in progress.failures if f.get("round", 0) == 0}) == progress.shards:
                break  # every shard failed: nothing will be fused
    return progress


def _note(fleet: Fleet, record: Record, run_id: str, progress: Progress, now: float) -> None:
    if record.topic.endswith(".dlq"):
        context = deadletter.describe(record.headers)
        try:
            data = orjson.loads(record.value or b"")  # no value: no JSON, like a broken one
        except orjson.JSONDecodeError:
            return
        if isinstance(data, dict) and data.get("run_id") == run_id:
            progress.failures.append({"function": record.topic.removesuffix(".dlq"),
                                      "shard_id": data.get("shard_id"), "round": data.get("round", 0),
                                      "cloud": context.get("cloud"), "reason": context.get("reason")})
        return
    try:
        event = events.decode(record.key, record.value, record.headers)
        signing.check(fleet, event)  # the functions dead-letter what fails this; here it is just not shown
    except (events.MalformedEvent, signing.Untrusted):
        return
    data = cast(dict[str, Any], event.get_data())  # decode validated it against its schema: a JSON object
    kind = event["type"].removeprefix(contracts.TYPE_PREFIX)
    if kind == "placement.changed":  # may be read before the fused.ready it follows: keep by version
        decided = cast(PlacementChanged, data)
        progress.placements[decided["model_version"]] = decided
        if all(d["decision_id"] != decided["decision_id"] for d in progress.decisions):  # a redelivery: one decision
            progress.decisions.append(decided)
    elif kind == "deployment.status":
        status = cast(DeploymentStatus, data)
        progress.statuses.setdefault(status["model_version"], {})[status["cloud"]] = status
    if progress.placement:
        progress.times.setdefault("placed", now)
    if progress.deployed:
        progress.times.setdefault("serving", now)
    if data.get("run_id") != run_id:
        return
    if kind == "model.ready":
        progress.trained[data["round"]] = progress.trained.get(data["round"], 0) + 1
        progress.times.setdefault(f"trained.{data['round']}", now)
        progress.times[f"trained.{data['round']}.last"] = now
    elif kind == "onnx.ready":
        progress.exported[data["round"]] = progress.exported.get(data["round"], 0) + 1
        progress.members[(data["round"], data["shard_id"])] = cast(OnnxReady, data)
        progress.times[f"exported.{data['round']}.last"] = now
    elif kind == "round.started":
        progress.times[f"round.{data['round']}"] = now
    elif kind == "fused.ready":
        progress.fused = cast(FusedReady, data)
        progress.times["fused"] = now


def centralized(fleet: Fleet, prepared: Prepared) -> tuple[float, float]:
    """Test accuracy of the same model trained on all training rows in one place, and its seconds."""
    from skyfuse.ml import model as mlmodel

    shard = cast(ShardReady, prepared.shard_events[0].get_data())  # built by `prepare` against its schema
    given: dict[str, Any] = dict(shard.get("model") or {})  # the shards' spec; the user's model, if any
    spec = mlmodel.ModelSpec.from_dict({k: v for k, v in given.items() if k in mlmodel.ModelSpec.keys()
                                        and k != "proximal_mu"}, as_dict(fleet.training))
    template = (mlmodel.from_bytes(fetch(given["template_uri"], given["template_sha256"]))
                if "template_uri" in given else None)
    result = mlmodel.train(spec, prepared.train, len(prepared.train.classes), template=template)
    probs = mlmodel.predict_proba(result.model, prepared.test.X)
    return float((probs.argmax(1) == prepared.test.y).mean()), result.seconds


def score(prepared: Prepared, progress: Progress, centralized_accuracy: float,
          timings: dict[str, float | None]) -> dict[str, Any]:
    """The run's report: every accuracy on the test split."""
    from skyfuse.ml import fusion

    test = prepared.test
    shards: list[dict[str, Any]] = []
    for i, (cloud, part) in enumerate(prepared.shards):
        member = progress.members.get((0, str(i)))
        accuracy = fusion.accuracy(fetch(member["onnx_uri"], member["sha256"]), test) if member else None
        shards.append({"cloud": cloud, "shard_id": str(i), "rows": len(part), "accuracy": accuracy})
    fused = progress.fused
    assert fused is not None, "a run is scored once it fused a model"
    strategies = {s: fusion.accuracy(fetch(uri), test) for s, uri in fused["candidates"].items()}
    scored = [s["accuracy"] for s in shards if s["accuracy"] is not None]
    return {
        "run_id": prepared.plan.run_id,
        "plan": {k: v for k, v in asdict(prepared.plan).items() if k != "run_id"},
        "rows": {"train": len(prepared.train), "validation": len(prepared.validation), "test": len(test)},
        "classes": [str(c) for c in fused["classes"]],
        "shards": shards,
        "shard_mean_accuracy": sum(scored) / len(scored) if scored else None,
        "strategies": strategies,
        "validation": fused["strategies"],
        "fused": {"strategy": fused["strategy"], "accuracy": strategies[fused["strategy"]],
                  "version": fused["version"],
                  "model_uri": fused["model_uri"], "round": fused.get("round", 0),
                  "missing_clouds": fused.get("missing_clouds", []), "weights": cloud_weights(fused["members"])},
        "placements": [decision(d) for d in progress.decisions if d["model_version"] == fused["version"]],
        "centralized_accuracy": centralized_accuracy,
        "failures": progress.failures,
        "timings": timings,
    }


def cloud_weights(members: list[FusedMember]) -> dict[str, float]:
    """cloud → the fusion weight its members had, as used (summing to 1)."""
    weights: dict[str, float] = {}
    for m in members:
        weights[m["cloud"]] = weights.get(m["cloud"], 0.0) + m["weight"]
    return {cloud: round(w, 6) for cloud, w in weights.items()}


def decision(data: PlacementChanged) -> dict[str, Any]:
    """A placement.changed as a line of the run's placement timeline."""
    return {"at": data["decided_at"], "sequence": data["sequence"], "trigger": data["trigger"],
            "serving": [p["cloud"] for p in data["placements"] if p["weight"] > 0],
            "weights": {p["cloud"]: p["weight"] for p in data["placements"]}, "reason": data["reason"]}


def save(summary: dict[str, Any]) -> Path:
    run_id: str = summary["run_id"]
    folder = RUNS_DIR / run_id
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "summary.json"
    path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    (RUNS_DIR / "last").write_text(run_id)
    return path


def load(run_id: str | None = None) -> dict[str, Any]:
    run_id = run_id or (RUNS_DIR / "last").read_text().strip()
    summary: dict[str, Any] = orjson.loads((RUNS_DIR / run_id / "summary.json").read_bytes())  # as `save` wrote it
    return summary


def serves(endpoint: str, version: str, timeout_s: float) -> bool:
    """Whether the server at `endpoint` serves `version` within `timeout_s`, asked by GET /health
    (health checks are not requests: they count in no error rate)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            health = httpclient.get_json(f"{endpoint}/health")
            if isinstance(health, dict) and health.get("model_version") == version:
                return True
        except httpclient.HttpError:  # not up yet, or not answering JSON
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def check_serving(progress: Progress, endpoints: dict[str, str], test: Dataset, api_key: str | None = None,
                  timeout_s: float = 30) -> dict[str, dict[str, Any]]:
    """POST the test rows to every placed cloud's endpoint once it serves the fused version (within
    the servers' pointer poll interval); compare with the fused model run here."""
    from skyfuse.ml import fusion

    fused = progress.fused
    assert fused is not None, "the endpoints are checked once the run fused a model"
    model = fetch(fused["model_uri"], fused["sha256"])
    expected = [str(fused["classes"][i]) for i in fusion.predict(model, test.X).argmax(1)]
    headers = {"x-api-key": api_key} if api_key else {}
    results: dict[str, dict[str, Any]] = {}
    for cloud in progress.placed:
        serves(endpoints[cloud], fused["version"], timeout_s)
        got: list[str] = []
        status = 0
        doc: dict[str, Any] = {}
        for start in range(0, len(test.X), MAX_ROWS):  # the servers take at most MAX_ROWS rows per request
            rows = test.X[start:start + MAX_ROWS].tolist()
            answer = httpclient.post_json(f"{endpoints[cloud]}/predict", {"instances": rows, "format": "compact"},
                                          headers=headers, timeout_s=10)
            status, doc = answer.status, answer.json() if answer.body else {}
            if status != 200:
                break
            got += [str(c) for c in doc.get("predictions", [])]
        # a failed request leaves `got` short: the rows it did not get back do not agree
        results[cloud] = {"endpoint": endpoints[cloud], "status": status, "model_version": doc.get("model_version"),
                          "rows": len(expected), "agree": sum(a == b for a, b in zip(got, expected, strict=False))}
    return results


def placement_decisions(fleet: Fleet, bus: Bus, run_ids: set[str]) -> list[PlacementChanged]:
    """The verified placement.changed decisions on the bus for the models of these runs, oldest first."""
    topic = contracts.event_type("placement.changed").topic
    records = bus.read(topic, 100_000) if topic in bus.topics() else []
    found: list[PlacementChanged] = []
    for record in records:
        try:
            event = events.decode(record.key, record.value, record.headers)
            signing.check(fleet, event)
        except (events.MalformedEvent, signing.Untrusted, signing.KeySetupError):
            continue
        data = cast(PlacementChanged, event.get_data())  # decode validated it against its schema
        if any(data["model_version"].startswith(f"{r}-") for r in run_ids):
            found.append(data)
    return found
