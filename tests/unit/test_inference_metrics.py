"""Request metrics of inference (skyfuse.serving.metrics): percentiles, windows, the
`metrics.sampled` data they make, and the emitter publishing one event per window."""
import threading
import time

import numpy as np
import orjson

from skyfuse import config, contracts
from skyfuse.runtime.function import Runtime
from skyfuse.serving.metrics import LatencyRecorder, MetricsEmitter

PRICES = {"price_per_hour": 0.0416, "price_per_million_requests": 0.2}


def test_percentiles_are_within_two_percent():
    rec = LatencyRecorder()
    lat = np.random.default_rng(0).lognormal(mean=np.log(0.5e-3), sigma=0.8, size=20_000)  # seconds
    for x in lat:
        rec.record(float(x))
    w = rec.take()
    assert w.requests == 20_000
    for q in (0.5, 0.99):
        exact = np.quantile(lat * 1000, q)
        assert abs(w.percentile_ms(q) - exact) / exact < 0.02, (q, w.percentile_ms(q), exact)


def test_snapshot_is_valid_metrics_sampled_data():
    clock = [100.0]
    rec = LatencyRecorder(clock=lambda: clock[0], wall_clock=lambda: 1_800_000_000.25)
    for _ in range(99):
        rec.record(0.002)
    rec.record(0.050, error=True)
    clock[0] += 10.0
    data = rec.snapshot("gcp", **PRICES, model_version="r1-wavg-3f2a1c", capacity_rps=500.0)
    contracts.validate("metrics.sampled", data)
    assert data["cloud"] == "gcp" and data["source"] == "inference"
    assert data["window_s"] == 10.0 and data["requests"] == 100 and data["requests_per_s"] == 10.0
    assert abs(data["latency_ms"]["p50"] - 2.0) < 0.04 and abs(data["latency_ms"]["p99"] - 2.0) < 0.04
    assert data["error_rate"] == 0.01
    assert abs(data["load"] - (99 * 0.002 + 0.05) / 10) < 1e-6
    assert data["price"] == {"per_hour": 0.0416, "per_million_requests": 0.2, "currency": "USD"}
    assert data["model_version"] == "r1-wavg-3f2a1c" and data["capacity_rps"] == 500.0
    assert data["sampled_at"] == "2027-01-15T08:00:00.250Z"  # the window's end, by the wall clock given


def test_an_empty_window_has_null_latencies_and_resets():
    rec = LatencyRecorder()
    rec.record(0.001)
    rec.snapshot("aws", **PRICES)
    data = rec.snapshot("aws", **PRICES, window_s=30)
    contracts.validate("metrics.sampled", data)
    assert data["requests"] == 0 and data["latency_ms"] == {"p50": None, "p99": None}
    assert data["error_rate"] == 0.0 and data["window_s"] == 30 and data["model_version"] is None


def test_recording_from_many_threads_loses_nothing():
    rec = LatencyRecorder()

    def work():
        for _ in range(20_000):
            rec.record(0.0001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w = rec.take()
    assert w.requests == 80_000 and sum(w.counts) == 80_000


def test_emitter_publishes_one_event_per_window_on_the_bus(tmp_path):
    fleet = config.load(environ={"SKYFUSE_BUS__EMBEDDED__PATH": str(tmp_path / "bus")})
    runtime = Runtime("azure", "inference", fleet)
    rec = LatencyRecorder()
    describe = lambda: {"cloud": "azure", **PRICES, "model_version": "v7"}  # noqa: E731
    emitter = MetricsEmitter(rec, lambda data: runtime.emit("metrics.sampled", data), describe, interval_s=0.01)
    for _ in range(500):
        rec.record(0.001)
    emitter.start()
    deadline = time.monotonic() + 30
    while emitter.emitted < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    emitter.stop()
    records = runtime.bus.read("skyfuse.metrics.sampled")
    assert 3 <= len(records) == emitter.emitted
    docs = [orjson.loads(r.value) for r in records]
    assert {r.key for r in records} == {b"azure"}
    assert sum(d["requests"] for d in docs) == 500  # each request in exactly one window
    assert docs[0]["requests"] == 500 and all(d["model_version"] == "v7" for d in docs)
    runtime.bus.close()


def test_emitter_survives_a_failing_publish():
    def broken(data):
        raise ConnectionError("bus down")

    emitter = MetricsEmitter(LatencyRecorder(), broken, lambda: {"cloud": "aws", **PRICES}, interval_s=60)
    assert emitter.emit_once() is None
    assert emitter.failures == 1 and "bus down" in emitter.last_error
