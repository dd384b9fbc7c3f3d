"""How a run's shards are dealt to clouds and how the user's fusion weights are read and used."""
import pytest

from services.fuser.handler import member_weights
from skyfuse import training


def test_shards_are_dealt_to_the_clouds_in_turn():
    plan = training.Plan(target="y", clouds=["aws", "gcp", "azure"], shards_per_cloud=4)
    assert plan.shard_clouds == ["aws", "gcp", "azure"] * 4
    assert training.Plan(target="y", clouds=["gcp"]).shard_clouds == ["gcp"]


def test_weights_parse_and_check():
    weights = training.parse_weights(" aws=0.3, gcp=0.3,azure=0.4 ")
    assert weights == {"aws": 0.3, "gcp": 0.3, "azure": 0.4}
    training.check_weights(weights, ["aws", "gcp", "azure"])
    training.check_weights({"aws": 0.0, "gcp": 2.0}, ["aws", "gcp"])  # a zero weight is allowed, not all zero
    for text in ("aws", "aws=", "=1", "aws=one", "aws=nan", ",", "aws=1,aws=1"):
        with pytest.raises(ValueError):
            training.parse_weights(text)
    for weights, clouds in [({"aws": 1.0}, ["aws", "gcp"]), ({"aws": 1.0, "gcp": float("inf")}, ["aws", "gcp"]),
                            ({"aws": 0.0, "gcp": 0.0}, ["aws", "gcp"]), ({"aws": -0.1, "gcp": 1.0}, ["aws", "gcp"])]:
        with pytest.raises(ValueError):
            training.check_weights(weights, clouds)


def member(cloud, samples):
    return {"cloud": cloud, "samples": samples}


def test_member_weights_by_rows_or_by_the_users_cloud_weights():
    members = [member("aws", 100), member("aws", 300), member("gcp", 200), member("azure", 50)]
    assert member_weights(members, {}) == [100.0, 300.0, 200.0, 50.0]
    given = member_weights(members, {"weights": {"aws": 0.3, "gcp": 0.3, "azure": 0.4}})
    assert given == pytest.approx([0.075, 0.225, 0.3, 0.4])  # a cloud's weight is shared by its shards' rows
    # a cloud whose members are all missing (fused on quorum): the others keep their given ratio
    assert member_weights(members[:3], {"weights": {"aws": 0.3, "gcp": 0.3, "azure": 0.4}}) == pytest.approx(
        [0.075, 0.225, 0.3])


def test_cloud_weights_as_used_and_a_decision_line():
    members = [{"cloud": "aws", "weight": 0.1}, {"cloud": "aws", "weight": 0.2}, {"cloud": "gcp", "weight": 0.7}]
    assert training.cloud_weights(members) == {"aws": 0.3, "gcp": 0.7}
    line = training.decision({"decided_at": "2026-01-01T00:00:00Z", "sequence": 3, "trigger": "metrics",
                              "placements": [{"cloud": "gcp", "weight": 1.0}, {"cloud": "aws", "weight": 0.0}],
                              "reason": "why"})
    assert line == {"at": "2026-01-01T00:00:00Z", "sequence": 3, "trigger": "metrics", "serving": ["gcp"],
                    "weights": {"gcp": 1.0, "aws": 0.0}, "reason": "why"}
