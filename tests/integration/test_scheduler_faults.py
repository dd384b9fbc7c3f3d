"""The scheduler under faults: a restart resumes its smoothing and dwell clocks exactly, a
redelivered event is not counted twice, and a decision whose publish failed is published by the
retry."""
import threading
from datetime import timedelta

import pytest

from services.scheduler import handler
from skyfuse.runtime.function import hosted, run_handler
from tests.integration.test_scheduler_time import T0, Scheduler, moves, serving

PRICES = {"aws": 0.040, "gcp": 0.041, "azure": 0.042}


def minutes(scheduler, start, count, prices, restart_at=None):
    t = start
    for minute in range(count):
        if minute == restart_at:
            handler._schedulers.clear()  # the process died; a new one starts from the store
        for cloud, price in prices.items():
            scheduler.sample(cloud, t, price)
        t += timedelta(minutes=1)
    return t


def run(tmp_path, restart_at=None):
    scheduler = Scheduler(tmp_path)
    scheduler.model("v1", T0)
    t = minutes(scheduler, T0, 30, PRICES)
    rising = {**PRICES, serving(scheduler.decisions[-1])[0]: 0.40, "azure": 0.030}
    minutes(scheduler, t, 20, rising, restart_at=restart_at)
    return scheduler


def test_a_restart_resumes_smoothing_and_dwell_clocks_exactly(tmp_path):
    reference = run(tmp_path / "reference")
    restarted = run(tmp_path / "restarted", restart_at=3)  # mid-dwell: better for 3 of the 5 minutes
    [move] = moves(reference)
    assert [m["decided_at"] for m in moves(restarted)] == [move["decided_at"]]
    assert moves(restarted)[0]["scores"] == move["scores"]  # the same smoothed figures


def test_a_redelivered_sample_is_not_counted_twice(tmp_path):
    scheduler = Scheduler(tmp_path)
    scheduler.model("v1", T0)

    def sample(at):
        return scheduler.event("metrics.sampled", {
            "cloud": "gcp", "source": "inference", "window_s": 60, "sampled_at": at, "requests": 60,
            "requests_per_s": 1.0, "latency_ms": {"p50": 10, "p99": 30}, "error_rate": 0.0, "load": 0.1,
            "price": {"per_hour": 0.05, "per_million_requests": 0.2, "currency": "USD"}})

    def deliver(event):
        with hosted(scheduler.runtime):
            run_handler(scheduler.handle, event, scheduler.runtime)

    first, second = sample("2026-11-27T12:00:00Z"), sample("2026-11-27T12:01:00Z")
    deliver(first)
    deliver(first)  # redelivered to the same process
    deliver(second)
    assert handler._schedulers["aws"].state.metrics.clouds["gcp"].samples == 2
    handler._schedulers.clear()  # ... and after a restart
    deliver(second)
    assert handler._schedulers["aws"].state.metrics.clouds["gcp"].samples == 2


def test_a_decision_whose_publish_failed_is_published_by_the_retry(tmp_path, monkeypatch):
    scheduler = Scheduler(tmp_path)
    scheduler.model("v1", T0)
    t = minutes(scheduler, T0, 30, PRICES)
    before = len(scheduler.decisions)
    real, failures = scheduler.bus.publish, {"left": 1}

    def publish(topic, value, key=None, headers=None):
        if topic == "skyfuse.placement.changed" and failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("broker unreachable")
        return real(topic, value, key, headers)

    monkeypatch.setattr(scheduler.bus, "publish", publish)
    rising = {**PRICES, serving(scheduler.decisions[-1])[0]: 0.40, "azure": 0.030}
    sent = []
    for minute in range(20):
        for cloud, price in rising.items():
            event = scheduler.event("metrics.sampled", {
                "cloud": cloud, "source": "inference", "window_s": 60,
                "sampled_at": (t + timedelta(minutes=minute)).isoformat().replace("+00:00", "Z"), "requests": 3000,
                "requests_per_s": 50.0, "latency_ms": {"p50": 13.3, "p99": 40.0}, "error_rate": 0.0, "load": 0.2,
                "capacity_rps": 500, "price": {"per_hour": price, "per_million_requests": 0.2, "currency": "USD"}})
            for _attempt in range(2):  # the host retries a failed delivery
                try:
                    with hosted(scheduler.runtime):
                        run_handler(scheduler.handle, event, scheduler.runtime)
                    break
                except ConnectionError:
                    sent.append(event["id"])
    assert failures["left"] == 0 and len(sent) == 1  # one publish failed ...
    published = [orjson_data(r) for r in scheduler.bus.read("skyfuse.placement.changed")]
    assert len(published) == before + 1 and serving(published[-1]) == ["azure"]  # ... and its retry published
    assert handler._schedulers["aws"].state.metrics.clouds["azure"].samples == 50  # counted once each


def orjson_data(record):
    import orjson

    return orjson.loads(record.value)


@pytest.fixture(autouse=True)
def fresh():
    handler._schedulers.clear()
    yield
    handler._schedulers.clear()


def test_two_scheduler_instances_never_both_advance_the_state(tmp_path, monkeypatch):
    """Instance A loads state n; instance B writes n+1 while A is deciding: A's write of n+1 is
    refused, A retries (no attempt spent) on B's state, and both events count exactly once."""
    from skyfuse.runtime.idempotency import InProgress

    scheduler = Scheduler(tmp_path)
    scheduler.model("v1", T0)
    store = scheduler.runtime.store()

    def sample(cloud, minute):
        return scheduler.event("metrics.sampled", {
            "cloud": cloud, "source": "inference", "window_s": 60,
            "sampled_at": (T0 + timedelta(minutes=minute)).isoformat().replace("+00:00", "Z"), "requests": 60,
            "requests_per_s": 1.0, "latency_ms": {"p50": 10, "p99": 30}, "error_rate": 0.0, "load": 0.1,
            "price": {"per_hour": 0.05, "per_million_requests": 0.2, "currency": "USD"}})

    def deliver(event):
        with hosted(scheduler.runtime):
            run_handler(scheduler.handle, event, scheduler.runtime)

    real = handler._on_event

    def racing(runtime, event, kind, data, work):  # B commits its own event while A decides
        monkeypatch.setattr(handler, "_on_event", real)
        a_view = dict(handler._schedulers)
        handler._schedulers.clear()
        deliver(sample("azure", 1))
        handler._schedulers.clear()
        handler._schedulers.update(a_view)
        return real(runtime, event, kind, data, work)

    monkeypatch.setattr(handler, "_on_event", racing)
    monkeypatch.setattr(handler, "_lock", threading.RLock())  # B runs inside A's call, in this thread
    mine = sample("gcp", 1)
    with pytest.raises(InProgress, match="another scheduler instance wrote state"):
        deliver(mine)
    assert scheduler.runtime.claimed_elsewhere.pop(mine["id"]) == 0.05  # the host waits, spends no attempt
    deliver(mine)  # the retry
    latest = handler._scheduler(scheduler.runtime)
    assert {c: m.samples for c, m in latest.state.metrics.clouds.items()} == {"azure": 1, "gcp": 1}
    assert len(store.list(handler.STATE_DIR)) <= handler.KEEP_SNAPSHOTS
