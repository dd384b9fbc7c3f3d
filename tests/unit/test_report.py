"""`skyfuse report`: accuracy from chance (labelled), the spread over several runs, the validation
scores that chose the strategy, time per stage and the placement timeline with cost."""
from skyfuse import report


def summary(run_id, shift=0.0):
    return {"run_id": run_id, "plan": {"partition": "iid"}, "classes": ["benign", "malignant"],
            "shards": [{"cloud": c, "shard_id": str(i), "rows": 10, "accuracy": 0.90 + shift}
                       for i, c in enumerate(("aws", "gcp"))],
            "strategies": {"wavg": 0.95 + shift, "vote": 0.93 + shift}, "validation": {"wavg": 0.97, "vote": 0.96},
            "fused": {"strategy": "wavg", "version": f"{run_id}-wavg-1"}, "centralized_accuracy": 0.96,
            "timings": {"prepare_s": 0.1, "train_s": 2.0, "fusion_s": 5.0, "serving_s": 6.0}}


def placement(at, weights, costs):
    return {"decided_at": at, "model_version": "r1-wavg-1", "reason": "cheapest",
            "placements": [{"cloud": c, "weight": w, "replicas": 1} for c, w in weights.items()],
            "scores": [{"cloud": c, "cost": v, "performance": 0.1, "total": v} for c, v in costs.items()]}


def test_several_runs_show_mean_and_spread_from_chance(tmp_path):
    rows = {r["label"]: r for r in report.accuracy_rows([summary("r1"), summary("r2", 0.02)])}
    assert rows["wavg"]["test"] == [0.95, 0.97] and rows["wavg"]["kind"] == "chosen"
    assert rows["wavg"]["validation"] == [0.97, 0.97] and not rows["centralized"]["validation"]
    assert report.chance(summary("r1")) == 0.5
    png, page = report.write([summary("r1"), summary("r2", 0.02)], tmp_path, [
        placement("2026-11-28T10:00:00Z", {"aws": 1.0, "gcp": 0.0}, {"aws": 1.0, "gcp": 1.3}),
        placement("2026-11-28T10:20:00Z", {"aws": 0.0, "gcp": 1.0}, {"aws": 1.6, "gcp": 1.0})])
    text = page.read_text()
    assert png.read_bytes().startswith(b"\x89PNG") and "data:image/png;base64," in text
    assert "96.0% (95.0–97.0)" in text  # wavg over the two runs, with its range
    assert "axis starts at chance (50%)" in text
    assert "<h2>Time per stage (s)</h2>" in text and "<td>fused.ready</td><td>5.0</td>" in text
    assert "2026-11-28T10:20:00Z" in text and "gcp 100%" in text and "aws 1.60" in text


def test_a_run_without_placements_says_so(tmp_path):
    _, page = report.write(summary("r1"), tmp_path)
    assert "No placement of this run's model on the bus." in page.read_text()
