"""A training run from the user's side: split the data, place each shard in its cloud's store,
publish shard.ready, follow the run's events to fused.ready, then score everything on the test rows.

The test split never leaves this process: it is used for neither training nor choosing (the fuser
chooses on the validation split), so the figures reported here are honest.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import orjson
from cloudevents.http import CloudEvent

from skyfuse import contracts, events, signing, tracing
from skyfuse.bus import Bus
from skyfuse.config import Fleet
from skyfuse.runtime import deadletter
from skyfuse.storage import fetch, open_store

RUNS_DIR = Path(".skyfuse/runs")
FOLLOWED = ["model.ready", "onnx.ready", "round.started", "fused.ready", "placement.changed", "deployment.status"]
FAILURES = ["trainer", "exporter", "fuser", "scheduler", "deployer"]


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


@dataclass
class Prepared:
    plan: Plan
    train: object
    validation: object
    test: object
    shards: list  # (cloud, Dataset)
    shard_events: list[CloudEvent]  # signed, when signing is on
    seconds: float
    fleet: Fleet


def prepare(fleet: Fleet, dataset, plan: Plan) -> Prepared:
    """Split, partition, upload; returns the shard.ready events, not yet published."""
    import numpy as np

    from skyfuse.ml import data as mldata
    from skyfuse.ml import model as mlmodel

    started = time.monotonic()
    unknown = [c for c in plan.clouds if c not in fleet.clouds]
    if unknown:
        raise ValueError(f"--clouds names {', '.join(unknown)}, not configured; configured clouds: {', '.join(fleet.clouds)}")
    train, validation, test = mldata.split(dataset, seed=plan.seed)
    parts = mldata.partition(train, len(plan.clouds), plan.partition, seed=plan.seed, alpha=plan.alpha)
    control = open_store(fleet.clouds[fleet.control_cloud or next(iter(fleet.clouds))].store)
    task = "binary" if len(dataset.classes) == 2 else "multiclass"
    control.put(f"runs/{plan.run_id}/run.json", orjson.dumps({
        "target": dataset.target, "classes": dataset.classes, "features": dataset.features, "task": task}))
    control.put(f"runs/{plan.run_id}/validation.csv", mldata.to_csv_bytes(validation))
    mean, variance = mlmodel.pooled_stats([(p.X.mean(0), p.X.var(0), len(p)) for p in parts])
    settings = fleet.training
    model = {"hidden": settings.hidden, "epochs": settings.epochs, "batch_size": settings.batch_size,
             "learning_rate": settings.learning_rate, "seed": plan.seed, "finetune_epochs": settings.finetune_epochs,
             "standardization": {"mean": np.asarray(mean).tolist(), "variance": np.asarray(variance).tolist()}}
    if plan.init:
        raw = Path(plan.init).read_bytes()
        saved = control.put(f"runs/{plan.run_id}/init.keras", raw)
        model.update(init_uri=saved.uri, init_sha256=saved.sha256)
    manifest = {"expected_members": len(parts), "clouds": plan.clouds, "quorum": len(parts) // 2 + 1,
                "timeout_s": plan.timeout_s or settings.quorum_timeout_s, "fusion": plan.fusion, "rounds": plan.rounds}
    shard_events = []
    signer = signing.signer_for(fleet, signing.CLI)
    for i, (cloud, part) in enumerate(zip(plan.clouds, parts)):
        saved = open_store(fleet.clouds[cloud].store).put(f"runs/{plan.run_id}/shards/{i}.csv", mldata.to_csv_bytes(part))
        shard_events.append(events.new_event("shard.ready", {
            "run_id": plan.run_id, "round": 0, "shard_id": str(i), "cloud": cloud, "uri": saved.uri,
            "sha256": saved.sha256, "bytes": saved.size, "rows": len(part), "features": dataset.features,
            "target": dataset.target, "task": task, "classes": dataset.classes, "partition": plan.partition,
            "manifest": manifest, "model": model,
        }, source=signing.source_of(signing.CLI), subject=cloud))
        if signer:
            signer.sign(shard_events[-1])
    return Prepared(plan, train, validation, test, list(zip(plan.clouds, parts)), shard_events,
                    time.monotonic() - started, fleet)


@dataclass
class Progress:
    """What the follower has seen of one run."""

    shards: int
    rounds: int
    trained: dict[int, int] = field(default_factory=dict)  # round → model.ready count
    exported: dict[int, int] = field(default_factory=dict)
    members: dict[tuple[int, str], dict] = field(default_factory=dict)  # (round, shard) → onnx.ready data
    failures: list[dict] = field(default_factory=list)
    fused: dict | None = None
    placements: dict[str, dict] = field(default_factory=dict)  # model version → its last placement.changed
    statuses: dict[str, dict[str, dict]] = field(default_factory=dict)  # version → cloud → deployment.status
    times: dict[str, float] = field(default_factory=dict)  # milestone → seconds since start

    @property
    def placement(self) -> dict | None:
        return self.placements.get((self.fused or {}).get("version"))

    @property
    def deployments(self) -> dict[str, dict]:
        return self.statuses.get((self.fused or {}).get("version"), {})

    @property
    def placed(self) -> list[str]:
        return [p["cloud"] for p in (self.placement or {}).get("placements", []) if p["weight"] > 0]

    @property
    def deployed(self) -> bool:
        """Every placed cloud serves the fused version, or one has failed to."""
        states = [self.deployments.get(c, {}).get("state") for c in self.placed]
        return bool(states) and (all(s == "serving" for s in states) or "failed" in states)


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


def _note(fleet: Fleet, record, run_id: str, progress: Progress, now: float) -> None:
    if record.topic.endswith(".dlq"):
        context = deadletter.describe(record.headers)
        try:
            data = orjson.loads(record.value)
        except orjson.JSONDecodeError:
            return
        if isinstance(data, dict) and data.get("run_id") == run_id:
            progress.failures.append({"function": record.topic.removesuffix(".dlq"), "shard_id": data.get("shard_id"),
                                      "round": data.get("round", 0), "cloud": context.get("cloud"),
                                      "reason": context.get("reason")})
        return
    try:
        event = events.decode(record.key, record.value, record.headers)
        signing.check(fleet, event)  # the functions dead-letter what fails this; here it is just not shown
    except (events.MalformedEvent, signing.Untrusted):
        return
    data = event.get_data()
    kind = event["type"].removeprefix(contracts.TYPE_PREFIX)
    if kind == "placement.changed":  # may be read before the fused.ready it follows: keep by version
        progress.placements[data["model_version"]] = data
    elif kind == "deployment.status":
        progress.statuses.setdefault(data["model_version"], {})[data["cloud"]] = data
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
        progress.members[(data["round"], data["shard_id"])] = data
        progress.times[f"exported.{data['round']}.last"] = now
    elif kind == "round.started":
        progress.times[f"round.{data['round']}"] = now
    elif kind == "fused.ready":
        progress.fused = data
        progress.times["fused"] = now


def centralized(fleet: Fleet, prepared: Prepared) -> tuple[float, float]:
    """Test accuracy of the same model trained on all training rows in one place, and its seconds."""
    from skyfuse.ml import model as mlmodel

    settings = fleet.training
    spec = mlmodel.ModelSpec(hidden=tuple(settings.hidden), epochs=settings.epochs, batch_size=settings.batch_size,
                             learning_rate=settings.learning_rate, seed=prepared.plan.seed)
    result = mlmodel.train(spec, prepared.train, len(prepared.train.classes))
    probs = result.model.predict(prepared.test.X, verbose=0)
    return float((probs.argmax(1) == prepared.test.y).mean()), result.seconds


def score(prepared: Prepared, progress: Progress, centralized_accuracy: float, timings: dict) -> dict:
    """The run's report: every accuracy on the test split."""
    from skyfuse.ml import fusion

    test = prepared.test
    shards = []
    for i, (cloud, part) in enumerate(prepared.shards):
        member = progress.members.get((0, str(i)))
        accuracy = fusion.accuracy(fetch(member["onnx_uri"], member["sha256"]), test) if member else None
        shards.append({"cloud": cloud, "shard_id": str(i), "rows": len(part), "accuracy": accuracy})
    fused = progress.fused
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
        "fused": {"strategy": fused["strategy"], "accuracy": strategies[fused["strategy"]], "version": fused["version"],
                  "model_uri": fused["model_uri"], "round": fused.get("round", 0),
                  "missing_clouds": fused.get("missing_clouds", [])},
        "centralized_accuracy": centralized_accuracy,
        "failures": progress.failures,
        "timings": timings,
    }


def save(summary: dict) -> Path:
    folder = RUNS_DIR / summary["run_id"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "summary.json"
    path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    (RUNS_DIR / "last").write_text(summary["run_id"])
    return path


def load(run_id: str | None = None) -> dict:
    run_id = run_id or (RUNS_DIR / "last").read_text().strip()
    return orjson.loads((RUNS_DIR / run_id / "summary.json").read_bytes())


def check_serving(progress: Progress, endpoints: dict[str, str], test, api_key: str | None = None,
                  timeout_s: float = 30) -> dict[str, dict]:
    """POST the test rows to every placed cloud's endpoint; compare with the fused model run here."""
    import http.client
    from urllib.parse import urlsplit

    from skyfuse.ml import fusion

    fused = progress.fused
    model = fetch(fused["model_uri"], fused["sha256"])
    expected = [str(fused["classes"][i]) for i in fusion.predict(model, test.X).argmax(1)]
    body = orjson.dumps({"instances": test.X.tolist(), "format": "compact"})
    results = {}
    for cloud in progress.placed:
        url = urlsplit(endpoints[cloud])
        deadline, answer = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:  # the servers swap within their pointer poll interval
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
            conn.request("POST", f"{url.path}/predict", body,
                         {"content-type": "application/json", **({"x-api-key": api_key} if api_key else {})})
            response = conn.getresponse()
            answer = (response.status, orjson.loads(response.read()))
            conn.close()
            if answer[0] == 200 and answer[1].get("model_version") == fused["version"]:
                break
            time.sleep(0.25)
        status, doc = answer
        got = [str(c) for c in doc.get("predictions", [])] if status == 200 else []
        results[cloud] = {"endpoint": endpoints[cloud], "status": status, "model_version": doc.get("model_version"),
                          "rows": len(expected), "agree": sum(a == b for a, b in zip(got, expected))}
    return results
