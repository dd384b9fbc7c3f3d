"""`skyfuse demo --scenario worked-example` on a fresh folder: the design's worked example end to
end, with a load step against the serving cloud's real endpoint that moves serving by response time."""
import json

from tests.conftest import fleet_env
from tests.integration.test_training import run_cli


def test_worked_example_moves_serving_by_response_time(tmp_path):
    run = run_cli(fleet_env("embedded", tmp_path), "demo", "--scenario", "worked-example", "--json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert [(s["cloud"], s["rows"]) for s in summary["shards"]] == [("aws", 1000), ("gcp", 1000), ("azure", 1000)]
    assert summary["plan"]["model_options"] == {"hidden": [], "init": "normal", "optimizer": "sgd",
                                                "learning_rate": 0.01, "epochs": 10, "batch_size": 1_000_000,
                                                "early_stopping": False}
    assert summary["fused"]["strategy"] == "wavg"
    assert summary["fused"]["weights"] == {"aws": 0.3, "gcp": 0.3, "azure": 0.4}
    first = summary["placements"][0]
    assert first["trigger"] == "model" and len(first["serving"]) == 1
    assert all({"at", "trigger", "serving", "reason"} <= set(p) for p in summary["placements"])
    target = summary["scenario"]["moved"]["from"]  # the cloud serving when the load step began
    step = {p["name"]: p for p in summary["load_phases"]}[f"load on {target}"]
    moves = [p for p in summary["placements"] if p["at"] > step["since"] and target not in p["serving"]]
    assert moves and moves[0]["trigger"] == "metrics" and "p99" in moves[0]["reason"], summary["placements"]
    loaded = step["clouds"]  # what callers waited (the monitor's probes): longest where the load is
    assert loaded[target]["probe_p99_ms"] > max(m["probe_p99_ms"] for c, m in loaded.items() if c != target)
    assert loaded[target]["requests_per_s"] > 0 and loaded[target]["cpu"] > 0
    assert set(summary["scenario"]["load_answers"]) == {"200"}
    for phase in summary["load_phases"]:  # every cloud's probes were answered throughout
        assert all(m["probe_error_rate"] == 0.0 for m in phase["clouds"].values()), phase
    assert [s["agree"] for s in summary["serving"].values()] == [summary["rows"]["test"]] == [1500]
