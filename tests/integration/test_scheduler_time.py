"""The scheduler decides on the events' own times, never the wall clock: the same events give the
same decisions whatever the date on this machine, a model announced "after" the metrics does not
freeze placement, and one cloud's clock running an hour fast neither fast-forwards the dwell
timers nor keeps that cloud looking alive after it stops."""
from datetime import UTC, datetime, timedelta

import pytest
import time_machine

from skyfuse import config, signing
from skyfuse.bus import open_bus
from skyfuse.runtime.function import Runtime, hosted, run_handler
from skyfuse.storage import open_store
from tests.conftest import fleet_env, signed_event

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
CLOUDS = ("aws", "gcp", "azure")


def stamp(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


class Scheduler:
    """The scheduler's core in the control cloud (aws), called as its host would."""

    def __init__(self, tmp_path):
        from services.scheduler.handler import _schedulers, handle

        _schedulers.clear()  # a fresh scheduler process
        # events carry T0-based times whatever today is: the replay window (tested in test_signing)
        # is opened wide, so that only the scheduler's own use of time is under test here
        env = fleet_env("embedded", tmp_path, SKYFUSE_SIGNING__KEYS_DIR=tmp_path / "keys",
                        SKYFUSE_SIGNING__MAX_AGE_S=1e12, SKYFUSE_SIGNING__MAX_SKEW_S=1e12)
        env.update({f"SKYFUSE_CLOUDS__{c.upper()}__STORE": f"file://{tmp_path}/stores/{c}" for c in CLOUDS})
        self.fleet = config.load(environ=env)
        signing.ensure_local_keys(self.fleet)
        self.bus = open_bus(self.fleet)
        self.handle = handle
        self.runtime = Runtime("aws", "scheduler", self.fleet, bus_factory=lambda: self.bus)

    def event(self, type_name: str, data: dict, at: datetime | None = None):
        """As its producer signs it: the control cloud's fuser, or the sampled cloud's inference function."""
        by = "aws/fuser" if type_name == "fused.ready" else f"{data['cloud']}/inference"
        return signed_event(type_name, data, by, self.fleet, time=stamp(at) if at else None)

    def send(self, type_name: str, data: dict, at: datetime | None = None) -> None:
        event = self.event(type_name, data, at)
        with hosted(self.runtime):
            run_handler(self.handle, event, self.runtime)

    def model(self, version: str, at: datetime | None = None) -> None:
        saved = open_store(self.fleet.clouds["aws"].store).put(f"runs/r1/fused/{version}.onnx", b"model bytes")
        self.send("fused.ready", {
            "run_id": "r1", "version": version, "strategy": "wavg", "model_uri": saved.uri, "sha256": saved.sha256,
            "cloud": "aws",
            "members": [{"cloud": "aws", "shard_id": "0", "weight": 1.0, "samples": 10, "accuracy": 0.9}],
            "metrics": {"validation_accuracy": 0.9}, "strategies": {"wavg": 0.9}, "opset": 17,
            "classes": ["a", "b"]}, at)

    def sample(self, cloud: str, at: datetime, price: float, p99: float = 40.0) -> None:
        self.send("metrics.sampled", {
            "cloud": cloud, "source": "inference", "window_s": 60, "sampled_at": stamp(at), "requests": 3000,
            "requests_per_s": 50.0, "latency_ms": {"p50": p99 / 3, "p99": p99}, "error_rate": 0.0, "load": 0.2,
            "capacity_rps": 500, "price": {"per_hour": price, "per_million_requests": 0.2, "currency": "USD"}})

    @property
    def decisions(self) -> list[dict]:
        return [e.get_data() for e in self.runtime.emitted if e["type"] == "skyfuse.placement.changed"]


def serving(decision: dict) -> list[str]:
    return [p["cloud"] for p in decision["placements"] if p["weight"] > 0]


def price_rise(scheduler: Scheduler, start: datetime, model_at: datetime | None = None) -> datetime:
    """30 min of steady metrics with the model placed, then a tenfold price rise where it is
    served; returns the time of the rise."""
    prices = {"aws": 0.040, "gcp": 0.041, "azure": 0.042}
    scheduler.model("v1", model_at)
    t = start
    for _ in range(30):
        for i, (cloud, price) in enumerate(prices.items()):
            scheduler.sample(cloud, t, price, p99=40 + (i + t.minute) % 3)
        t += timedelta(minutes=1)
    rise = t
    prices[serving(scheduler.decisions[-1])[0]] = 0.40
    prices["azure"] = 0.030
    for _ in range(25):
        for cloud, price in prices.items():
            scheduler.sample(cloud, t, price)
        t += timedelta(minutes=1)
    return rise


def moves(scheduler: Scheduler) -> list[dict]:
    return [d for d in scheduler.decisions if d["trigger"] == "metrics"]


@pytest.mark.parametrize("wall_clock", [T0 - timedelta(days=3), T0 + timedelta(days=3), T0 + timedelta(days=365)],
                         ids=["3-days-before", "3-days-after", "a-year-after"])
def test_the_same_events_give_the_same_decisions_whatever_the_wall_clock(tmp_path, wall_clock):
    reference = Scheduler(tmp_path / "reference")
    price_rise(reference, T0, model_at=T0)
    with time_machine.travel(wall_clock, tick=True):
        shifted = Scheduler(tmp_path / "shifted")
        price_rise(shifted, T0, model_at=T0)
    def same(decisions):  # the stores live in different folders
        return [{k: v for k, v in d.items() if k != "model_uri"} for d in decisions]

    assert same(shifted.decisions) == same(reference.decisions)
    [move] = moves(reference)
    assert serving(move) == ["azure"]
    assert move["decided_at"] == stamp(T0 + timedelta(minutes=30 + 5))  # the rise, then the 300 s dwell
    assert move["clock"] == {"source": "event", "event_time": move["decided_at"]}


def test_a_model_announced_after_the_samples_does_not_freeze_placement(tmp_path):
    scheduler = Scheduler(tmp_path)
    for cloud in CLOUDS:  # metrics already flowing
        scheduler.sample(cloud, T0 - timedelta(minutes=1), 0.05)
    rise = price_rise(scheduler, T0, model_at=T0 + timedelta(days=1))
    first = scheduler.decisions[0]
    assert first["trigger"] == "model" and first["decided_at"] == stamp(T0 - timedelta(minutes=1))
    assert first["clock"]["source"] == "clock" and first["clock"]["event_time"] == stamp(T0 + timedelta(days=1))
    [move] = moves(scheduler)
    moved_after = datetime.fromisoformat(move["decided_at"]) - rise
    assert timedelta(seconds=300) <= moved_after <= timedelta(seconds=480)


def test_a_model_announced_before_any_sample_counts_its_dwell_from_the_first_sample(tmp_path):
    scheduler = Scheduler(tmp_path)
    rise = price_rise(scheduler, T0, model_at=T0 + timedelta(days=1))
    first = scheduler.decisions[0]
    assert first["decided_at"] == stamp(T0 + timedelta(days=1)) and first["clock"]["source"] == "event"
    [move] = moves(scheduler)
    assert timedelta(seconds=300) <= datetime.fromisoformat(move["decided_at"]) - rise <= timedelta(seconds=480)


def test_a_sample_from_an_hour_in_the_future_is_bounded_to_the_clock(tmp_path):
    scheduler = Scheduler(tmp_path)
    scheduler.model("v1", T0)
    prices = {"aws": 0.040, "gcp": 0.041, "azure": 0.042}
    t = T0
    for _ in range(20):
        for cloud, price in prices.items():
            scheduler.sample(cloud, t, price)
        t += timedelta(minutes=1)
    [home] = serving(scheduler.decisions[-1])
    scheduler.sample(home, t + timedelta(hours=1), prices[home])  # its clock jumps an hour ahead, then it dies
    last_real = t - timedelta(minutes=1)
    while not moves(scheduler) and t < T0 + timedelta(hours=2):
        for cloud, price in prices.items():
            if cloud != home:
                scheduler.sample(cloud, t, price)
        t += timedelta(minutes=1)
    [failover] = moves(scheduler)
    assert home not in serving(failover) and "failover" in failover["reason"]
    # stale after 150 s of silence at the clock, not an hour later (nor an hour early)
    waited = datetime.fromisoformat(failover["decided_at"]) - last_real
    assert timedelta(seconds=150) < waited <= timedelta(seconds=240)
    assert all(d["decided_at"] <= stamp(t) for d in scheduler.decisions)


def test_samples_from_unconfigured_clouds_and_ancient_samples_are_skipped(tmp_path, caplog):
    scheduler = Scheduler(tmp_path)
    scheduler.model("v1", T0)
    for cloud in CLOUDS:
        scheduler.sample(cloud, T0, 0.04)
    with caplog.at_level("INFO"):
        scheduler.sample("mars", T0, 0.01)
        scheduler.sample("gcp", T0 - timedelta(hours=2), 0.04)
    notes = [r.getMessage() for r in caplog.records]
    assert any("cloud 'mars', which is not configured" in n for n in notes)
    assert any("more than 3600 s late are refused" in n for n in notes)
    from services.scheduler.handler import _schedulers
    assert set(_schedulers["aws"].state.metrics.clouds) == set(CLOUDS)
