"""The fuser's core: collects the members of a training round and fuses them into one ONNX graph.

It acts in the control cloud and keeps each round's state in that cloud's store
(`runs/<run>/round-<r>/`, the layout in skyfuse.storage.keys): a record per onnx.ready member, the
time the first one arrived (the quorum timeout clock), each strategy's fused model and scores, the
server strategies' state, and the global model the trainers fine-tune in the next round.

Each round is fused once through the idempotency layer (key `fuse/<run>/round-<r>`): a duplicated
onnx.ready, or the timer and the last member at the same time, never fuse twice, and a fusion that
fails half-way (a store timeout, a failed emit) leaves nothing that blocks its retry. The events it
emits have ids derived from that key.

A round fuses when all expected members are in, or, on the timer, when a quorum is in and the
manifest's timeout has passed. With a server strategy (fusion `fedavg`, `fedprox`, `fedadam`,
`fedyogi`, or `auto`: fedavg, fedadam and fedyogi, the step with the best validation accuracy
continuing) and rounds left, it makes the next global model from the members' parameters and the
strategy's state after the round before (skyfuse.ml.federated), keeps the new state in
server.json and emits round.started; after the last round (or earlier, once `[training]
rounds_patience` rounds in a row scored no better on validation than the best before them) it
picks the strategy with the best validation accuracy over all rounds (or the one the manifest
forces) and emits fused.ready. The
server strategies need one architecture in every member (the built-in MLP, or one user model every
trainer started from): members that differ are dead-lettered with the difference when one is
forced, and fused by the ensembles only under auto.
"""
from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any, NotRequired, cast

import orjson
from cloudevents.http import CloudEvent

from skyfuse.payloads import Manifest, OnnxReady
from skyfuse.runtime.function import Rejected, Runtime
from skyfuse.serving.onnx_refs import refuse_external_data
from skyfuse.storage import Store, keys
from skyfuse.storage.confine import OutsideFleet

if TYPE_CHECKING:  # the ML modules are imported when a round is fused
    import numpy as np

    from skyfuse.ml.data import Dataset

MAX_ID = keys.MAX_ID


class MemberRecord(OnnxReady):
    """What the fuser keeps of each member (`keys.member_record`): its onnx.ready and where it came from."""

    event_id: NotRequired[str]
    traceparent: NotRequired[str | None]


def handle(event: CloudEvent, runtime: Runtime) -> None:
    if runtime.cloud != runtime.control_cloud:
        runtime.received(event, f"skipped: the fuser acts in the control cloud ({runtime.control_cloud})")
        return
    data = cast(OnnxReady, event.get_data())
    store = runtime.store()
    run_id, round_ = data["run_id"], data["round"]
    store.put(keys.member_record(run_id, round_, data["cloud"], data["shard_id"]),
              orjson.dumps({**data, "event_id": event["id"], "traceparent": event.get("traceparent")}))
    store.create(keys.round_opened(run_id, round_), orjson.dumps({"at": time.time(), "manifest": data["manifest"]}))
    if len(store.list(keys.round_members(run_id, round_))) >= data["manifest"]["expected_members"]:
        complete_round(runtime, run_id, round_, caused_by=event)
    runtime.received(event)


def on_timer(runtime: Runtime) -> None:
    """Fuse every open round whose quorum is in and whose timeout has passed. One round that
    cannot be read or fused is logged and left for the next tick; it never stops the others."""
    if runtime.cloud != runtime.control_cloud:
        return
    store = runtime.store()
    for key in store.list(keys.ROOT):
        if (opened := keys.parse_round_opened(key)) is not None:
            try:
                _check_quorum(runtime, store, *opened)
            except Exception as exc:  # noqa: BLE001 - one bad round must not block every other run
                runtime.log.warning("quorum check of %s failed: %s: %s", key, type(exc).__name__, exc)


def _check_quorum(runtime: Runtime, store: Store, run_id: str, round_: int) -> None:
    if runtime.done(_fusion_key(run_id, round_)):
        return
    opened = orjson.loads(store.get(keys.round_opened(run_id, round_)))
    manifest: Manifest = opened["manifest"]
    if time.time() - opened["at"] >= manifest["timeout_s"] and \
            len(store.list(keys.round_members(run_id, round_))) >= manifest["quorum"]:
        complete_round(runtime, run_id, round_, caused_by=None)


def _fusion_key(run_id: str, round_: int) -> str:
    return f"fuse/{run_id}/round-{round_}"


def complete_round(runtime: Runtime, run_id: str, round_: int, caused_by: CloudEvent | None) -> None:
    key = _fusion_key(run_id, round_)
    with runtime.once(key) as claim:
        if not claim.done:
            _fuse(runtime, run_id, round_, caused_by, key)


def _fuse(runtime: Runtime, run_id: str, round_: int, caused_by: CloudEvent | None, key: str) -> None:
    from skyfuse.ml import data as mldata
    from skyfuse.ml import federated, fusion

    store = runtime.store()
    members: list[MemberRecord] = [orjson.loads(store.get(k)) for k in store.list(keys.round_members(run_id, round_))]
    manifest = members[0]["manifest"]
    run = orjson.loads(store.get(keys.run_info(run_id)))
    validation = mldata.load_csv(store.get(keys.validation(run_id)), run["target"], classes=run["classes"])
    try:
        onnx_models = [runtime.fetch(m["onnx_uri"], m["sha256"]) for m in members]
    except OutsideFleet as exc:
        raise Rejected(str(exc)) from None
    for member, model in zip(members, onnx_models, strict=True):
        try:
            refuse_external_data(model, f"member {member['onnx_uri']}")
        except ValueError as exc:
            raise Rejected(str(exc)) from None
    weights = member_weights(members, manifest)
    strategies: tuple[str, ...] = federated.AUTO if manifest["fusion"] == "auto" else (manifest["fusion"],)
    averaging = set(strategies) & set(federated.SERVER_STRATEGIES)
    mismatch = architecture_mismatch(members, onnx_models) if averaging else None
    if mismatch and manifest["fusion"] in federated.SERVER_STRATEGIES:
        raise Rejected(mismatch)
    if mismatch:  # auto: the ensembles fuse members of any architecture
        strategies = tuple(s for s in strategies if s not in federated.SERVER_STRATEGIES)
        runtime.log.warning("%s: %s; fusing with %s only", keys.round_folder(run_id, round_), mismatch,
                            ", ".join(strategies))
    lineage = {
        "run_id": run_id, "round": round_, "features": run["features"], "classes": run["classes"],
        "members": [{"cloud": m["cloud"], "shard_id": m["shard_id"], "samples": m["samples"],
                     "weight": w / sum(weights), "validation_accuracy": m["validation"]["accuracy"]}
                    for m, w in zip(members, weights, strict=True)],
    }
    scores: dict[str, dict[str, Any]] = {}
    for strategy in (s for s in strategies if s in federated.ENSEMBLES):
        fused = fusion.fuse(strategy, onnx_models, weights, lineage={**lineage, "strategy": strategy})
        saved = store.put(keys.round_fused(run_id, round_, strategy), fused)
        scores[strategy] = {"accuracy": fusion.accuracy(fused, validation), "uri": saved.uri, "sha256": saved.sha256}
    servers = tuple(s for s in strategies if s in federated.SERVER_STRATEGIES)
    next_global = _server_round(runtime, run_id, round_, servers, onnx_models, weights, validation, lineage,
                                scores) if servers else None
    store.put(keys.round_scores(run_id, round_), orjson.dumps(scores))
    clouds = sorted({m["cloud"] for m in members})
    if next_global is not None and round_ + 1 < manifest["rounds"] and not federated.plateaued(
            _best_by_round(store, run_id, round_), runtime.fleet.training.rounds_patience):
        global_model = store.put(keys.global_model(run_id, round_ + 1),
                                 _global_keras(runtime, members, next_global))
        # the next round waits for the members this one had, not for the ones that already failed
        following = {**manifest, "expected_members": len(members), "quorum": min(manifest["quorum"], len(members))}
        runtime.emit("round.started", {
            "run_id": run_id, "round": round_ + 1, "global_model_uri": global_model.uri,
            "sha256": global_model.sha256, "clouds": clouds, "epochs": runtime.fleet.training.finetune_epochs,
            "manifest": following,
        }, caused_by=caused_by, traceparent=None if caused_by else members[0].get("traceparent"), dedupe_key=key)
        return
    _announce(runtime, run_id, round_, members, weights, manifest, run, caused_by, key)


def member_weights(members: list[MemberRecord], manifest: Manifest) -> list[float]:
    """Each member's fusion weight: its rows; or, when the user fixed per-cloud weights (manifest
    `weights`), its cloud's weight shared by that cloud's members in proportion to their rows."""
    given = manifest.get("weights")
    if not given:
        return [float(m["samples"]) for m in members]
    rows: dict[str, float] = {}
    for m in members:
        rows[m["cloud"]] = rows.get(m["cloud"], 0.0) + m["samples"]
    return [given.get(m["cloud"], 0.0) * m["samples"] / rows[m["cloud"]] for m in members]


def architecture_mismatch(members: list[MemberRecord], onnx_models: list[bytes]) -> str | None:
    """Why FedAvg cannot average these members (one has another architecture), or None."""
    from skyfuse.ml import fusion

    found = fusion.fedavg_mismatch(onnx_models)
    if found is None:
        return None
    i, what = found
    first, other = (f"{m['cloud']}-{m['shard_id']}" for m in (members[0], members[i]))
    what = what.replace("member 0", first).replace("this member", other)
    return (f"fedavg needs the same model architecture in every member, and {other} differs from {first}: {what} "
            "(train every shard from one model: skyfuse train --model, or fuse with wavg, vote or confidence)")


def _best_by_round(store: Store, run_id: str, last_round: int) -> list[float]:
    """Each scored round's best validation accuracy (any strategy), rounds 0 to `last_round`."""
    scored = [keys.round_scores(run_id, r) for r in range(last_round + 1)]
    return [max((s["accuracy"] for s in orjson.loads(store.get(k)).values()), default=0.0)
            for k in scored if store.exists(k)]


def _best_per_strategy(store: Store, run_id: str, last_round: int) -> dict[str, dict[str, Any]]:
    """For each strategy, its best-scoring round (earliest on ties)."""
    best: dict[str, dict[str, Any]] = {}
    for round_ in range(last_round + 1):
        key = keys.round_scores(run_id, round_)
        if not store.exists(key):
            continue
        for strategy, score in orjson.loads(store.get(key)).items():
            if strategy not in best or score["accuracy"] > best[strategy]["accuracy"]:
                best[strategy] = {**score, "round": round_}
    return best


def _announce(runtime: Runtime, run_id: str, round_: int, members: list[MemberRecord], weights: list[float],
              manifest: Manifest, run: dict[str, Any], caused_by: CloudEvent | None, key: str) -> None:
    store = runtime.store()
    best = _best_per_strategy(store, run_id, round_)
    forced = manifest["fusion"] != "auto"
    # ties go to the simpler model: one averaged network before ensembles of several
    order = ["fedavg", "fedprox", "fedadam", "fedyogi", "wavg", "confidence", "vote"]
    chosen = manifest["fusion"] if forced else max(best, key=lambda s: (best[s]["accuracy"], -order.index(s)))
    pick = best[chosen]
    model = runtime.fetch(pick["uri"], pick["sha256"])
    version = model_version(run_id, chosen, pick["sha256"])
    saved = store.put(keys.fused_model(run_id, version), model)
    total = sum(weights)
    runtime.emit("fused.ready", {
        "run_id": run_id, "version": version, "round": pick["round"], "strategy": chosen, "model_uri": saved.uri,
        "sha256": saved.sha256, "cloud": runtime.cloud,
        "members": [{"cloud": m["cloud"], "shard_id": m["shard_id"], "weight": w / total, "samples": m["samples"],
                     "accuracy": m["validation"]["accuracy"]} for m, w in zip(members, weights, strict=True)],
        "missing_clouds": sorted(set(manifest["clouds"]) - {m["cloud"] for m in members}),
        "metrics": {"validation_accuracy": pick["accuracy"]},
        "strategies": {s: b["accuracy"] for s, b in best.items()},
        "candidates": {s: b["uri"] for s, b in best.items()},
        "opset": members[0]["opset"], "features": run["features"], "classes": run["classes"], "task": run["task"],
    }, caused_by=caused_by, traceparent=None if caused_by else members[0].get("traceparent"), dedupe_key=key)


def model_version(run_id: str, strategy: str, sha256: str) -> str:
    """`<run>-<strategy>-<sha256[:6]>`, within the 128 characters of an id: a longer run id is
    cut and followed by a digest of the whole, so versions stay distinct."""
    suffix = f"-{strategy}-{sha256[:6]}"
    if len(run_id) + len(suffix) <= MAX_ID:
        return run_id + suffix
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
    return f"{run_id[:MAX_ID - len(suffix) - 9]}~{digest}{suffix}"


def _server_round(runtime: Runtime, run_id: str, round_: int, servers: tuple[str, ...], onnx_models: list[bytes],
                  weights: list[float], validation: Dataset, lineage: dict[str, Any],
                  scores: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    """Step each server strategy of the run (skyfuse.ml.federated) from its state after the last
    round, score each one's global model on the validation rows into `scores`, and continue from
    the best (ties: the earlier in `servers`). The states go to `round-<r>/server.json`, made from
    the round before's and this round's members only, so a retried round writes the same again.
    Round 0 is every strategy's warm start (the members' mean): only the first one is scored then.
    Returns the next global model's parameters by ONNX initializer name."""
    from skyfuse.ml import federated, fusion

    store = runtime.store()
    settings = runtime.fleet.training
    optimizers = [federated.strategy(s, eta=settings.server_lr, tau=settings.server_tau, beta_1=settings.server_beta1,
                                     beta_2=settings.server_beta2, proximal_mu=settings.proximal_mu) for s in servers]
    averaged = fusion.fuse("fedavg", onnx_models, weights)  # checks the members share one graph
    params = [fusion.parameters(m) for m in onnx_models]
    names = list(params[0])
    previous = None
    if round_ > 0:
        previous = federated.loads(store.get(keys.server_state(run_id, round_ - 1)))
        if previous["names"] != names:
            raise federated.FederatedError(f"round {round_}'s members have other parameters than round {round_ - 1}'s")
    members = [[p[n] for n in names] for p in params]
    states = federated.round_states(optimizers, previous and previous["states"], members, weights)
    for optimizer in optimizers[:1] if round_ == 0 else optimizers:
        s = optimizer.name
        fused = fusion.with_parameters(averaged, dict(zip(names, states[s]["global"], strict=True)), s,
                                       lineage={**lineage, "strategy": s, "server": optimizer.params()})
        saved = store.put(keys.round_fused(run_id, round_, s), fused)
        scores[s] = {"accuracy": fusion.accuracy(fused, validation), "uri": saved.uri, "sha256": saved.sha256}
    chosen = max((s for s in servers if s in scores), key=lambda s: (scores[s]["accuracy"], -servers.index(s)))
    states = federated.follow(states, chosen)
    store.put(keys.server_state(run_id, round_),
              federated.dumps({"round": round_, "names": names, "chosen": chosen, "states": states}))
    return dict(zip(names, states[chosen]["global"], strict=True))


def _global_keras(runtime: Runtime, members: list[MemberRecord], params: dict[str, np.ndarray]) -> bytes:
    """The next global model as a .keras file: a member's model (every member has the one
    architecture) with its weights set from the parameters a server strategy made."""
    from skyfuse.ml import model as mlmodel

    template = mlmodel.from_bytes(runtime.fetch(members[0]["model_uri"], members[0]["source_sha256"]),
                                  keep=True)  # a warm instance keeps the architecture's model
    return mlmodel.to_bytes(mlmodel.with_onnx_weights(template, params))
