"""The keys of a training run in the stores: every `runs/…` key is built here, and the one that is
read back (a round's opened.json, found by the fuser's quorum timer) is parsed here.

    runs/<run>/run.json                                target, classes, features, task (`skyfuse train`)
    runs/<run>/validation.csv                          the rows strategies are chosen on (never the test rows)
    runs/<run>/model.keras                             the user's model every trainer starts from (--model)
    runs/<run>/init.keras                              the warm start every trainer starts from (--init)
    runs/<run>/shards/<shard>.csv                      a shard, in the store of the cloud that trains it
    runs/<run>/trainer/shard-<shard>.json              a trainer's copy of its shard.ready (FedAvg rounds)
    runs/<run>/round-<r>/models/<cloud>-<shard>.keras  a member's Keras model, beside .validation.csv
    runs/<run>/round-<r>/onnx/<cloud>-<shard>.onnx     the member exported
    runs/<run>/round-<r>/members/<cloud>-<shard>.json  the fuser's record of one onnx.ready
    runs/<run>/round-<r>/opened.json                   when the first member arrived (quorum timeout clock)
    runs/<run>/round-<r>/fused-<strategy>.onnx         a strategy's fused model; scores.json scores them all
    runs/<run>/round-<r>/server.json                   server strategies' state after round r (global model, moments)
    runs/<run>/round-<r+1>/global.keras                the model the trainers fine-tune in round r+1
    runs/<run>/fused/<version>.onnx                    the model fused.ready announces

The control cloud's store holds the run's own files and the fuser's; a shard and the models made
from it stay in the store of the cloud that trains it. Every part is an id as the event schemas
define it (`events/schemas`: `$defs/id`): no `/`, no whitespace, not `.` or `..`, so a key has one
reading and never leaves its run's folder; anything else is refused with ValueError.
"""
from __future__ import annotations

import re

ROOT = "runs/"  # every run's folder lies under it
MAX_ID = 128  # events/schemas: $defs/id
ID_PATTERN = r"^(?!\.\.?$)[^\s/]+$"  # events/schemas: $defs/id
_ID = re.compile(ID_PATTERN)
_OPENED = re.compile(rf"^{re.escape(ROOT)}(?P<run>[^/]+)/round-(?P<round>0|[1-9][0-9]*)/opened\.json$")


def _id(value: str, what: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID or not _ID.match(value):
        raise ValueError(f"{what} {value!r} cannot be part of a store key: ids are 1-{MAX_ID} characters, "
                         "without whitespace or '/', and not '.' or '..'")
    return value


def _round(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"round {value!r} cannot be part of a store key: rounds are integers from 0")
    return value


def run_folder(run_id: str) -> str:
    """`runs/<run>/`: everything of one run."""
    return f"{ROOT}{_id(run_id, 'run id')}/"


def run_info(run_id: str) -> str:
    return f"{run_folder(run_id)}run.json"


def validation(run_id: str) -> str:
    return f"{run_folder(run_id)}validation.csv"


def model_template(run_id: str) -> str:
    return f"{run_folder(run_id)}model.keras"


def init_model(run_id: str) -> str:
    return f"{run_folder(run_id)}init.keras"


def shard(run_id: str, shard_id: str) -> str:
    return f"{run_folder(run_id)}shards/{_id(shard_id, 'shard id')}.csv"


def trainer_shards(run_id: str) -> str:
    """The folder of a trainer's shard records (`trainer_shard`)."""
    return f"{run_folder(run_id)}trainer/"


def trainer_shard(run_id: str, shard_id: str) -> str:
    return f"{trainer_shards(run_id)}shard-{_id(shard_id, 'shard id')}.json"


def round_folder(run_id: str, round_: int) -> str:
    """`runs/<run>/round-<r>/`: everything of one round."""
    return f"{run_folder(run_id)}round-{_round(round_)}/"


def _member(cloud: str, shard_id: str) -> str:
    return f"{_id(cloud, 'cloud')}-{_id(shard_id, 'shard id')}"


def member_model(run_id: str, round_: int, cloud: str, shard_id: str) -> str:
    return f"{round_folder(run_id, round_)}models/{_member(cloud, shard_id)}.keras"


def member_validation(run_id: str, round_: int, cloud: str, shard_id: str) -> str:
    """The validation rows a member was scored on, beside its model."""
    return f"{round_folder(run_id, round_)}models/{_member(cloud, shard_id)}.validation.csv"


def member_onnx(run_id: str, round_: int, cloud: str, shard_id: str) -> str:
    return f"{round_folder(run_id, round_)}onnx/{_member(cloud, shard_id)}.onnx"


def round_members(run_id: str, round_: int) -> str:
    """The folder of a round's member records (`member_record`)."""
    return f"{round_folder(run_id, round_)}members/"


def member_record(run_id: str, round_: int, cloud: str, shard_id: str) -> str:
    return f"{round_members(run_id, round_)}{_member(cloud, shard_id)}.json"


def round_opened(run_id: str, round_: int) -> str:
    return f"{round_folder(run_id, round_)}opened.json"


def round_fused(run_id: str, round_: int, strategy: str) -> str:
    return f"{round_folder(run_id, round_)}fused-{_id(strategy, 'strategy')}.onnx"


def round_scores(run_id: str, round_: int) -> str:
    return f"{round_folder(run_id, round_)}scores.json"


def server_state(run_id: str, round_: int) -> str:
    return f"{round_folder(run_id, round_)}server.json"


def global_model(run_id: str, round_: int) -> str:
    """The global model round `round_` starts from (made by the round before)."""
    return f"{round_folder(run_id, round_)}global.keras"


def fused_model(run_id: str, version: str) -> str:
    return f"{run_folder(run_id)}fused/{_id(version, 'model version')}.onnx"


def parse_round_opened(key: str) -> tuple[str, int] | None:
    """(run id, round) when `key` is a round's opened.json (`round_opened`); None for any other key."""
    found = _OPENED.match(key)
    if found is None or not _ID.match(found["run"]) or len(found["run"]) > MAX_ID:
        return None
    return found["run"], int(found["round"])
