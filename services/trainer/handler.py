"""The trainer's core: trains a Keras model on a shard that lives in its own cloud.

shard.ready (round 0): remember the shard, train from a seeded (or warm-start) initialisation, emit
model.ready; when the shard names a model template (a user's Keras model), train that instead of
the built-in MLP, on raw features. round.started (FedAvg round r ≥ 1): fine-tune every shard of the
run this cloud holds from the global model, emit model.ready for round r. Outputs have fixed keys
per (run, round, shard); each (run, round, shard) goes through the idempotency layer once, and its
model.ready has an id derived from it, so a duplicated event trains nothing twice and announces
nothing twice.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, cast

import orjson
from cloudevents.http import CloudEvent

from skyfuse.config import Training, as_dict
from skyfuse.payloads import ModelSettings, RoundStarted, ShardReady
from skyfuse.runtime.function import Rejected, Runtime
from skyfuse.storage import StoreError, keys

if TYPE_CHECKING:  # both import TensorFlow: the handler imports them when it trains
    import keras

    from skyfuse.ml.model import ModelSpec


def handle(event: CloudEvent, runtime: Runtime) -> None:
    store = runtime.store()
    if event["type"] == "skyfuse.shard.ready":
        data = cast(ShardReady, event.get_data())
        if data["cloud"] != runtime.cloud:
            runtime.received(event, "skipped: the shard lives in another cloud")
            return
        store.put(keys.trainer_shard(data["run_id"], data["shard_id"]), orjson.dumps(data))
        init = (data.get("model") or {}).get("init_uri")
        train_round(runtime, event, data, 0, init, (data.get("model") or {}).get("init_sha256"))
        return
    started = cast(RoundStarted, event.get_data())
    if runtime.cloud not in started["clouds"]:
        runtime.received(event, "skipped: this cloud is not in the round")
        return
    held = store.list(keys.trainer_shards(started["run_id"]))
    shards: list[ShardReady] = [orjson.loads(store.get(key)) for key in held]
    for shard in shards:  # the round's manifest (its members) replaces the first round's
        train_round(runtime, event, {**shard, "manifest": started["manifest"]}, started["round"],
                    started["global_model_uri"], started["sha256"], started["epochs"])


def train_round(runtime: Runtime, event: CloudEvent, shard: ShardReady, round_: int, init_uri: str | None,
                init_sha256: str | None, epochs: int | None = None) -> None:
    key = f"train/{shard['run_id']}/round-{round_}/{runtime.cloud}-{shard['shard_id']}"
    with runtime.once(key) as claim:
        if claim.done:
            runtime.received(event, "skipped: already trained (duplicate event)")
            return
        _train(runtime, event, shard, round_, init_uri, init_sha256, epochs, key)


def _train(runtime: Runtime, event: CloudEvent, shard: ShardReady, round_: int, init_uri: str | None,
           init_sha256: str | None, epochs: int | None, key: str) -> None:
    from skyfuse.ml import data as mldata
    from skyfuse.ml import model as mlmodel

    store = runtime.store()
    try:
        rows = mldata.load_csv(runtime.fetch(shard["uri"], shard["sha256"]), shard["target"], classes=shard["classes"])
    except (mldata.DataError, StoreError) as exc:
        raise Rejected(f"shard {shard['shard_id']} at {shard['uri']} cannot be read: {exc}") from exc
    settings = runtime.fleet.training
    given: ModelSettings = shard.get("model") or {}
    spec = model_spec(given, settings, shard["manifest"]["fusion"], round_)
    standardization = given.get("standardization")
    stats = (standardization["mean"], standardization["variance"]) if standardization else None
    initial = starting_model(runtime, init_uri, init_sha256) if init_uri else None
    template = user_model(runtime, given)
    try:  # every shard and round of one architecture reuses one compiled loop, as a warm instance would
        result = mlmodel.train(spec, rows, len(shard["classes"]), initial=initial, stats=stats, epochs=epochs,
                               template=template, keep_warm=True)
    except mlmodel.TrainingError as exc:
        raise Rejected(f"shard {shard['shard_id']} in {runtime.cloud} cannot train: {exc}") from exc
    member = (shard["run_id"], round_, runtime.cloud, shard["shard_id"])
    saved = store.put(keys.member_model(*member), mlmodel.to_bytes(result.model))
    assert result.validation_rows is not None  # train() always holds rows out (maybe none)
    validation = store.put(keys.member_validation(*member), mldata.to_csv_bytes(result.validation_rows))
    runtime.emit("model.ready", {
        "run_id": shard["run_id"], "round": round_, "shard_id": shard["shard_id"], "cloud": runtime.cloud,
        "model_uri": saved.uri, "sha256": saved.sha256, "samples": result.samples,
        "validation": result.validation, "features": shard["features"], "classes": shard["classes"],
        "task": shard["task"], "manifest": shard["manifest"], "train_seconds": round(result.seconds, 3),
        "validation_uri": validation.uri, "validation_sha256": validation.sha256,
    }, caused_by=event, dedupe_key=key)
    runtime.received(event, f"trained round {round_} on {len(rows)} rows")


_kept = threading.local()  # per host thread, as per function instance


def starting_model(runtime: Runtime, uri: str, sha256: str | None) -> keras.Model:
    """The model to start from (a round's global model, a warm start). A warm instance keeps the
    last one it loaded, by digest, since every shard of a round starts from it, and loads the next
    one's weights into it. Only its weights are read, never changed."""
    from skyfuse.ml import model as mlmodel

    if sha256 and getattr(_kept, "sha256", None) == sha256:
        kept: keras.Model = _kept.model
        return kept
    model = mlmodel.from_bytes(runtime.fetch(uri, sha256), keep=True)
    _kept.sha256, _kept.model = sha256, model  # fetched and checked against the digest, if one was given
    return model


def user_model(runtime: Runtime, given: ModelSettings) -> keras.Model | None:
    """The user's model the run trains instead of the MLP (`model.template_uri`, saved by
    `skyfuse train --model`; every trainer starts from its weights), or None."""
    from skyfuse.ml import model as mlmodel

    uri = given.get("template_uri")
    if not uri:
        return None
    try:
        return mlmodel.from_bytes(runtime.fetch(uri, given.get("template_sha256")))
    except StoreError as exc:
        raise Rejected(f"the model template {uri} cannot be read: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - keras raises many kinds for a file it cannot load
        raise Rejected(f"the model template {uri} cannot be loaded: {type(exc).__name__}: {exc}") from None


def model_spec(given: ModelSettings, settings: Training, fusion: str, round_: int = 0) -> ModelSpec:
    """The ModelSpec of a shard's `model` dict: the keys it sets, the fleet's training settings for
    the rest, then ModelSpec's own defaults. A fine-tuning round (r >= 1) trains as the fleet's
    `finetune_*` settings say (the learning rate decaying by round), for exactly its epochs (as
    FedAvg's clients do), with FedProx's proximal term in a fedprox run. A value ModelSpec refuses
    is a shard that cannot train, with the reason."""
    from skyfuse.ml import model as mlmodel

    fleet = {k: v for k, v in as_dict(settings).items() if k != "proximal_mu"}  # FedProx's only in fedprox runs
    spec = {**fleet, "seed": 0, **{k: v for k, v in given.items() if k in mlmodel.ModelSpec.keys()}}
    if round_ > 0:
        spec.update(optimizer=settings.finetune_optimizer, early_stopping=False,
                    learning_rate=settings.finetune_learning_rate * settings.finetune_lr_decay ** (round_ - 1))
        if fusion == "fedprox":
            spec.setdefault("proximal_mu", settings.proximal_mu)
    spec.setdefault("proximal_mu", 0.0)
    try:
        return mlmodel.ModelSpec.from_dict({k: v for k, v in spec.items() if k in mlmodel.ModelSpec.keys()})
    except (TypeError, ValueError) as exc:
        raise Rejected(f"the run's model settings cannot be used: {exc}") from exc
