"""skyfuse.storage.keys: the layout of a run in the stores, the one key read back, and the ids
refused because they would break the layout."""
import json
from pathlib import Path

import pytest

from skyfuse.storage import FileStore, keys

ID = json.loads((Path(__file__).parents[2] / "events/schemas/shard.ready.json").read_text())["$defs"]["id"]


def test_the_layout_is_the_documented_one():
    assert keys.run_info("r1") == "runs/r1/run.json"
    assert keys.validation("r1") == "runs/r1/validation.csv"
    assert keys.model_template("r1") == "runs/r1/model.keras"
    assert keys.init_model("r1") == "runs/r1/init.keras"
    assert keys.shard("r1", "0") == "runs/r1/shards/0.csv"
    assert keys.trainer_shard("r1", "0") == "runs/r1/trainer/shard-0.json"
    assert keys.trainer_shard("r1", "0").startswith(keys.trainer_shards("r1"))
    assert keys.member_model("r1", 2, "aws", "0") == "runs/r1/round-2/models/aws-0.keras"
    assert keys.member_validation("r1", 2, "aws", "0") == "runs/r1/round-2/models/aws-0.validation.csv"
    assert keys.member_onnx("r1", 2, "aws", "0") == "runs/r1/round-2/onnx/aws-0.onnx"
    assert keys.member_record("r1", 2, "aws", "0") == "runs/r1/round-2/members/aws-0.json"
    assert keys.member_record("r1", 2, "aws", "0").startswith(keys.round_members("r1", 2))
    assert keys.round_opened("r1", 2) == "runs/r1/round-2/opened.json"
    assert keys.round_fused("r1", 2, "wavg") == "runs/r1/round-2/fused-wavg.onnx"
    assert keys.round_scores("r1", 2) == "runs/r1/round-2/scores.json"
    assert keys.server_state("r1", 2) == "runs/r1/round-2/server.json"
    assert keys.global_model("r1", 3) == "runs/r1/round-3/global.keras"
    assert keys.fused_model("r1", "r1-wavg-3f2a1c") == "runs/r1/fused/r1-wavg-3f2a1c.onnx"


def test_every_key_lies_in_its_run_folder_and_the_docstring_names_each_kind():
    built = [keys.run_info("r"), keys.shard("r", "s"), keys.member_onnx("r", 0, "gcp", "s"), keys.fused_model("r", "v")]
    assert all(k.startswith(keys.run_folder("r")) and k.startswith(keys.ROOT) for k in built)
    for name in ("run.json", "validation.csv", "shards/<shard>.csv", "trainer/shard-<shard>.json", "opened.json",
                 "onnx/<cloud>-<shard>.onnx", "members/<cloud>-<shard>.json", "server.json", "global.keras",
                 "fused/<version>.onnx", "model.keras", "init.keras", "fused-<strategy>.onnx"):
        assert name in keys.__doc__, name


@pytest.mark.parametrize("run_id, round_", [("r1", 0), ("run-20250114-093000-ab12", 7), ("x" * 128, 12345),
                                            ("a.b_c~d", 1), ("..x", 0)])
def test_a_round_opened_key_parses_back(run_id, round_):
    assert keys.parse_round_opened(keys.round_opened(run_id, round_)) == (run_id, round_)


@pytest.mark.parametrize("key", [
    "runs/r1/round-0/scores.json", "runs/r1/round-0/members/aws-0.json", "runs/r1/opened.json",
    "runs/a/b/round-0/opened.json", "runs/r1/round-x/opened.json", "runs/r1/round-01/opened.json",
    "runs/r1/round--1/opened.json", "runs/../round-0/opened.json", "runs/a b/round-0/opened.json",
    f"runs/{'x' * 129}/round-0/opened.json", "other/r1/round-0/opened.json", "runs/r1/round-0/opened.json.tmp",
])
def test_other_keys_do_not_parse_as_a_round(key):
    assert keys.parse_round_opened(key) is None


@pytest.mark.parametrize("bad", ["", "a/b", "/", ".", "..", "a b", "tab\there", "x" * 129, None, 3])
def test_ids_that_would_break_the_layout_are_refused(bad):
    with pytest.raises(ValueError, match="cannot be part of a store key"):
        keys.run_info(bad)
    with pytest.raises(ValueError, match="shard id"):
        keys.shard("r1", bad)
    with pytest.raises(ValueError, match="cloud"):
        keys.member_onnx("r1", 0, bad, "0")
    with pytest.raises(ValueError, match="model version"):
        keys.fused_model("r1", bad)


@pytest.mark.parametrize("bad", [-1, True, 1.0, "0", None])
def test_rounds_are_integers_from_zero(bad):
    with pytest.raises(ValueError, match="round"):
        keys.round_opened("r1", bad)


def test_the_id_rule_is_the_schemas():
    assert (keys.ID_PATTERN, keys.MAX_ID) == (ID["pattern"], ID["maxLength"])


def test_a_file_uri_splits_at_the_runs_folder():
    uri = f"file:///x/stores/aws/{keys.shard('r1', '0')}"
    assert FileStore.split(uri) == ("file:///x/stores/aws", "runs/r1/shards/0.csv")
