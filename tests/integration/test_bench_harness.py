"""The benchmark suite's harness end to end (`bench/suite.py --smoke`): every group runs against
real servers and the real broker for a fraction of a second, and the results file carries every
key `make bench` promises, each with its unit and what it was measured against, plus the growth
series and their plot. It measures nothing: speed goals live in `make bench`, never in a test."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import suite  # noqa: E402


@pytest.mark.kafka
def test_the_smoke_run_writes_every_key_and_the_growth_plot(tmp_path, kafka_bootstrap):
    out, plot = tmp_path / "results.json", tmp_path / "growth.png"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "suite.py"), "--smoke", "--out", str(out),
                          "--plot", str(plot)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    results = json.loads(out.read_text())
    assert results["smoke"] is True and results["groups"] == list(suite.GROUPS)
    keys = {f["key"] for f in results["figures"]}
    missing = [k for group in suite.KEYS.values() for k in group if k not in keys]
    assert not missing, missing
    for figure in results["figures"]:
        assert figure["unit"] is not None and figure["against"], figure
        assert figure["value"] is not None or figure["note"], figure  # a value, or why there is none
        if figure["goal"]:
            assert figure["met"] in (True, False, None), figure
    growth = {g["name"] for g in results["growth"]}
    assert {name for names in suite.GROWTH.values() for name in names} <= growth
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "demo_end_to_end_s" in run.stdout  # the table was printed
