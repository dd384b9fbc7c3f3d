"""The fuser's core: collects the members of a training round and fuses them into one ONNX graph.

It acts in the control cloud and keeps each round's state in that cloud's store:

    runs/<run>/run.json                       target, classes, features (written by `skyfuse train`)
    runs/<run>/validation.csv                 the rows strategies are chosen on (never the test rows)
    runs/<run>/round-<r>/members/<cloud>-<shard>.json   one per onnx.ready
    runs/<run>/round-<r>/opened.json          when the first member arrived (quorum timeout clock)
    runs/<run>/round-<r>/fusing.claim         taken once: a duplicated onnx.ready never fuses twice
    runs/<run>/round-<r>/fused-<strategy>.onnx and scores.json

A round fuses when all expected members are in, or, on the timer, when a quorum is in and the
manifest's timeout has passed. With FedAvg (fusion `fedavg` or `auto`) and rounds left, it averages
the members' Keras weights into the next global model and emits round.started; after the last
round it picks the strategy with the best validation accuracy over all rounds (or the one the
manifest forces) and emits fused.ready.
"""
from __future__ import annotations

import time

import orjson
from cloudevents.http import CloudEvent

from skyfuse.runtime.function import Runtime
from skyfuse.storage import Store, fetch


def handle(event: CloudEvent, runtime: Runtime) -> None:
    if runtime.cloud != runtime.control_cloud:
        runtime.received(event, f"skipped: the fuser acts in the control cloud ({runtime.control_cloud})")
        return
    data = event.get_data()
    store = runtime.store()
    base = f"runs/{data['run_id']}/round-{data['round']}"
    store.put(f"{base}/members/{data['cloud']}-{data['shard_id']}.json", orjson.dumps({**data, "event_id": event["id"]}))
    store.create(f"{base}/opened.json", orjson.dumps({"at": time.time(), "manifest": data["manifest"]}))
    if len(store.list(f"{base}/members/")) >= data["manifest"]["expected_members"]:
        complete_round(runtime, data["run_id"], data["round"], caused_by=event)
    runtime.received(event)


def on_timer(runtime: Runtime) -> None:
    """Fuse every open round whose quorum is in and whose timeout has passed."""
    if runtime.cloud != runtime.control_cloud:
        return
    store = runtime.store()
    for key in store.list("runs/"):
        if not key.endswith("/opened.json"):
            continue
        base = key.removesuffix("/opened.json")
        if store.exists(f"{base}/fusing.claim"):
            continue
        opened = orjson.loads(store.get(key))
        manifest = opened["manifest"]
        if time.time() - opened["at"] >= manifest["timeout_s"] and \
                len(store.list(f"{base}/members/")) >= manifest["quorum"]:
            run_id, round_ = base.split("/")[1], int(base.rsplit("-", 1)[1])
            complete_round(runtime, run_id, round_, caused_by=None)


def complete_round(runtime: Runtime, run_id: str, round_: int, caused_by: CloudEvent | None) -> None:
    from skyfuse.ml import data as mldata
    from skyfuse.ml import fusion

    store = runtime.store()
    base = f"runs/{run_id}/round-{round_}"
    if not store.create(f"{base}/fusing.claim", orjson.dumps({"at": time.time(), "cloud": runtime.cloud})):
        return
    members = [orjson.loads(store.get(k)) for k in store.list(f"{base}/members/")]
    manifest = members[0]["manifest"]
    run = orjson.loads(store.get(f"runs/{run_id}/run.json"))
    validation = mldata.load_csv(store.get(f"runs/{run_id}/validation.csv"), run["target"], classes=run["classes"])
    onnx_models = [fetch(m["onnx_uri"], m["sha256"]) for m in members]
    weights = [float(m["samples"]) for m in members]
    strategies = fusion.STRATEGIES if manifest["fusion"] == "auto" else (manifest["fusion"],)
    lineage = {
        "run_id": run_id, "round": round_, "features": run["features"], "classes": run["classes"],
        "members": [{"cloud": m["cloud"], "shard_id": m["shard_id"], "samples": m["samples"], "weight": w / sum(weights),
                     "validation_accuracy": m["validation"]["accuracy"]} for m, w in zip(members, weights)],
    }
    scores = {}
    for strategy in strategies:
        fused = fusion.fuse(strategy, onnx_models, weights, lineage={**lineage, "strategy": strategy})
        saved = store.put(f"{base}/fused-{strategy}.onnx", fused)
        scores[strategy] = {"accuracy": fusion.accuracy(fused, validation), "uri": saved.uri, "sha256": saved.sha256}
    store.put(f"{base}/scores.json", orjson.dumps(scores))
    clouds = sorted({m["cloud"] for m in members})
    if "fedavg" in strategies and round_ + 1 < manifest["rounds"]:
        global_model = store.put(f"runs/{run_id}/round-{round_ + 1}/global.keras", _average_keras(members, weights))
        # the next round waits for the members this one had, not for the ones that already failed
        following = {**manifest, "expected_members": len(members), "quorum": min(manifest["quorum"], len(members))}
        runtime.emit("round.started", {
            "run_id": run_id, "round": round_ + 1, "global_model_uri": global_model.uri,
            "sha256": global_model.sha256, "clouds": clouds, "epochs": runtime.fleet.training.finetune_epochs,
            "manifest": following,
        }, caused_by=caused_by)
        return
    _announce(runtime, run_id, round_, members, weights, manifest, run, caused_by)


def _best_per_strategy(store: Store, run_id: str, last_round: int) -> dict[str, dict]:
    """For each strategy, its best-scoring round (earliest on ties)."""
    best: dict[str, dict] = {}
    for round_ in range(last_round + 1):
        key = f"runs/{run_id}/round-{round_}/scores.json"
        if not store.exists(key):
            continue
        for strategy, score in orjson.loads(store.get(key)).items():
            if strategy not in best or score["accuracy"] > best[strategy]["accuracy"]:
                best[strategy] = {**score, "round": round_}
    return best


def _announce(runtime: Runtime, run_id: str, round_: int, members: list[dict], weights: list[float],
              manifest: dict, run: dict, caused_by: CloudEvent | None) -> None:
    store = runtime.store()
    best = _best_per_strategy(store, run_id, round_)
    forced = manifest["fusion"] != "auto"
    # ties go to the simpler model: one averaged network before ensembles of several
    order = ["fedavg", "wavg", "confidence", "vote"]
    chosen = manifest["fusion"] if forced else max(best, key=lambda s: (best[s]["accuracy"], -order.index(s)))
    pick = best[chosen]
    model = fetch(pick["uri"], pick["sha256"])
    version = f"{run_id}-{chosen}-{pick['sha256'][:6]}"
    saved = store.put(f"runs/{run_id}/fused/{version}.onnx", model)
    total = sum(weights)
    runtime.emit("fused.ready", {
        "run_id": run_id, "version": version, "round": pick["round"], "strategy": chosen, "model_uri": saved.uri,
        "sha256": saved.sha256, "cloud": runtime.cloud,
        "members": [{"cloud": m["cloud"], "shard_id": m["shard_id"], "weight": w / total, "samples": m["samples"],
                     "accuracy": m["validation"]["accuracy"]} for m, w in zip(members, weights)],
        "missing_clouds": sorted(set(manifest["clouds"]) - {m["cloud"] for m in members}),
        "metrics": {"validation_accuracy": pick["accuracy"]},
        "strategies": {s: b["accuracy"] for s, b in best.items()},
        "candidates": {s: b["uri"] for s, b in best.items()},
        "opset": members[0]["opset"], "features": run["features"], "classes": run["classes"], "task": run["task"],
    }, caused_by=caused_by)


def _average_keras(members: list[dict], weights: list[float]) -> bytes:
    """The next global model: the members' Keras weights averaged, weighted by sample count."""
    from skyfuse.ml import model as mlmodel

    return mlmodel.to_bytes(mlmodel.average([mlmodel.from_bytes(fetch(m["model_uri"])) for m in members], weights))
