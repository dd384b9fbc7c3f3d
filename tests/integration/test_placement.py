"""The placement loop through the real cores: fused.ready → scheduler → placement.changed →
deployers → a real inference server; a price rise moves serving after the dwell time, noise does
not, and a corrupted model is never swapped in."""
import http.client
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import orjson
import pytest

from skyfuse import config
from skyfuse.bus import open_bus
from skyfuse.dev import hosts
from skyfuse.dev.local import serving_env
from skyfuse.runtime.function import Runtime, hosted, run_handler
from skyfuse.serving.testing import classifier
from skyfuse.storage import open_store
from tests.conftest import fleet_env, signed_event

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@pytest.fixture
def fleet(tmp_path):
    env = fleet_env("embedded", tmp_path)
    env.update({f"SKYFUSE_CLOUDS__{c.upper()}__STORE": f"file://{tmp_path}/stores/{c}"
                for c in ("aws", "gcp", "azure")})
    return config.load(environ=env)


class Loop:
    """Scheduler (in the control cloud, aws) and one deployer per cloud, called as their hosts would."""

    def __init__(self, fleet):
        from services.deployer.handler import handle as deploy
        from services.scheduler.handler import _schedulers
        from services.scheduler.handler import handle as schedule

        _schedulers.clear()  # a fresh scheduler process
        self.fleet, self.bus = fleet, open_bus(fleet)
        self.schedule, self.deploy = schedule, deploy
        self.runtimes = {c: Runtime(c, "deployer", fleet, bus_factory=lambda: self.bus) for c in fleet.clouds}
        self.scheduler = Runtime("aws", "scheduler", fleet, bus_factory=lambda: self.bus)

    def send(self, type_name, data):
        by = "aws/fuser" if type_name == "fused.ready" else f"{data['cloud']}/inference"
        event = signed_event(type_name, data, by, self.fleet)
        with hosted(self.scheduler):
            run_handler(self.schedule, event, self.scheduler)
        for decision in self.scheduler.emitted[len(getattr(self, "_seen", [])):]:
            for runtime in self.runtimes.values():
                with hosted(runtime):
                    run_handler(self.deploy, decision, runtime)
        self._seen = list(self.scheduler.emitted)

    @property
    def placements(self):
        return [e.get_data() for e in self.scheduler.emitted if e["type"] == "skyfuse.placement.changed"]

    def statuses(self, cloud):
        return [e.get_data() for e in self.runtimes[cloud].emitted if e["type"] == "skyfuse.deployment.status"]


def fused_ready(fleet, version, model):
    saved = open_store(fleet.clouds["aws"].store).put(f"runs/r1/fused/{version}.onnx", model)
    return {"run_id": "r1", "version": version, "strategy": "wavg", "model_uri": saved.uri, "sha256": saved.sha256,
            "cloud": "aws",
            "members": [{"cloud": "aws", "shard_id": "0", "weight": 1.0, "samples": 10, "accuracy": 0.9}],
            "metrics": {"validation_accuracy": 0.9}, "strategies": {"wavg": 0.9}, "opset": 17,
            "classes": ["setosa", "versicolor", "virginica"]}


def metrics(cloud, at, price_per_hour, p99=40.0, rps=50.0):
    return {"cloud": cloud, "source": "inference", "window_s": 60, "sampled_at": at.isoformat().replace("+00:00", "Z"),
            "requests": int(rps * 60), "requests_per_s": rps, "latency_ms": {"p50": p99 / 3, "p99": p99},
            "error_rate": 0.0, "load": 0.2, "capacity_rps": 500,
            "price": {"per_hour": price_per_hour, "per_million_requests": 0.2, "currency": "USD"}}


def get(url, path):
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    conn.request("GET", parts.path + path)
    response = conn.getresponse()
    return response.status, orjson.loads(response.read())


def test_price_rise_moves_serving_after_the_dwell_time_and_the_new_cloud_serves(fleet):
    loop = Loop(fleet)
    loop.send("fused.ready", fused_ready(fleet, "v1", classifier()))
    first = loop.placements[-1]
    home = next(p["cloud"] for p in first["placements"] if p["weight"] > 0)
    assert loop.statuses(home)[-1]["state"] == "serving"
    server = hosts.start("azure", None, serving_env(fleet, "azure"))  # the cloud the model should move to
    try:
        prices = {"aws": 0.040, "gcp": 0.041, "azure": 0.042}
        t = T0
        for _ in range(30):  # 30 min of steady, slightly noisy metrics: the placement holds
            for i, (cloud, price) in enumerate(prices.items()):
                loop.send("metrics.sampled", metrics(cloud, t, price, p99=40 + (i + t.minute) % 3))
            t += timedelta(minutes=1)
        settled = len(loop.placements)
        serving_now = [p["cloud"] for p in loop.placements[-1]["placements"] if p["weight"] > 0]
        prices[serving_now[0]] = 0.40  # a tenfold price rise where the model is served
        prices["azure"] = 0.030
        rise, moved_at = t, None
        for _ in range(25):
            for cloud, price in prices.items():
                loop.send("metrics.sampled", metrics(cloud, t, price))
            if moved_at is None and len(loop.placements) > settled:
                moved_at = t
            t += timedelta(minutes=1)
        assert moved_at is not None, "the price rise never moved serving"
        decision = loop.placements[settled]
        assert [p["cloud"] for p in decision["placements"] if p["weight"] > 0] == ["azure"]
        dwell = 300  # the policy's default dwell: better for that long before it moves
        assert dwell <= (moved_at - rise).total_seconds() <= dwell + 180
        assert len(loop.placements) == settled + 1  # and it does not flap back
        assert {s["cloud"]: s["state"] for s in (loop.statuses("azure")[-1], loop.statuses(serving_now[0])[-1])} == \
            {"azure": "serving", serving_now[0]: "removed"}
        assert {"cost", "performance", "total"} <= set(decision["scores"][0]) and decision["lambda"] == 1.0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and get(server.url, "/health")[1].get("model_version") != "v1":
            time.sleep(0.1)
        status, health = get(server.url, "/health")
        assert status == 200 and health["model_version"] == "v1"
    finally:
        server.stop()


def test_a_corrupted_model_is_never_deployed_and_the_old_one_keeps_serving(fleet):
    loop = Loop(fleet)
    loop.send("fused.ready", fused_ready(fleet, "v1", classifier(seed=1)))
    home = next(p["cloud"] for p in loop.placements[-1]["placements"] if p["weight"] > 0)
    pointer = open_store(fleet.clouds[home].store).get("serving/current.json")
    bad = fused_ready(fleet, "v2", b"this is not an onnx model")
    loop.send("fused.ready", bad)
    status = loop.statuses(home)[-1]
    assert status["state"] == "failed" and "not a loadable ONNX model" in status["reason"] and "v1" in status["reason"]
    assert open_store(fleet.clouds[home].store).get("serving/current.json") == pointer  # untouched
    tampered = fused_ready(fleet, "v3", classifier(seed=2))
    tampered["sha256"] = "0" * 64  # the bytes are not what the event announced
    loop.send("fused.ready", tampered)
    status = loop.statuses(home)[-1]
    assert status["state"] == "failed" and "sha256" in status["reason"]
    assert open_store(fleet.clouds[home].store).get("serving/current.json") == pointer


def test_a_model_with_external_data_is_never_deployed(fleet):
    from tests.unit.test_onnx_refs import pointing_outside

    loop = Loop(fleet)
    loop.send("fused.ready", fused_ready(fleet, "v1", classifier(seed=1)))
    home = next(p["cloud"] for p in loop.placements[-1]["placements"] if p["weight"] > 0)
    pointer = open_store(fleet.clouds[home].store).get("serving/current.json")
    loop.send("fused.ready", fused_ready(fleet, "evil", pointing_outside(classifier(seed=2))))
    status = loop.statuses(home)[-1]
    assert status["state"] == "failed"
    assert "external data" in status["reason"] and "still serving v1" in status["reason"]
    assert open_store(fleet.clouds[home].store).get("serving/current.json") == pointer


def test_a_forged_placement_naming_a_file_outside_the_stores_is_refused(fleet, tmp_path):
    """The review's attack: a placement.changed naming file:///…/anywhere/evil.onnx, with the right
    sha256. Unsigned, it is dead-lettered before the deployer sees it (test_signing); here it is
    signed with the control scheduler's own key, as if that key had leaked, and confinement still
    refuses it."""
    from services.deployer.handler import handle as deploy
    from skyfuse import contracts
    from skyfuse.runtime.function import Runtime, hosted, run_handler
    from skyfuse.storage import sha256_of

    evil = tmp_path / "anywhere" / "evil.onnx"
    evil.parent.mkdir()
    evil.write_bytes(classifier(seed=9))
    aws_store = open_store(fleet.clouds["aws"].store).uri
    for uri in (evil.as_uri(), "file:///etc/hostname", f"{aws_store}/../anywhere/evil.onnx"):
        data = {**contracts.sample("placement.changed"), "model_uri": uri, "sha256": sha256_of(evil.read_bytes()),
                "model_version": "evil", "source_cloud": "aws",
                "placements": [{"cloud": "gcp", "weight": 1.0, "replicas": 1}], "previous": []}
        data["decision_id"] = f"forged-{abs(hash(uri))}"
        runtime = Runtime("gcp", "deployer", fleet)
        with hosted(runtime):
            run_handler(deploy, signed_event("placement.changed", data, "aws/scheduler", fleet), runtime)
        [status] = [e.get_data() for e in runtime.emitted if e.get_data()["state"] == "failed"]
        assert "outside the fleet's stores" in status["reason"] or "segment '..'" in status["reason"], status
        assert not open_store(fleet.clouds["gcp"].store).exists("serving/current.json")


def test_an_older_decision_arriving_late_does_not_roll_serving_back(fleet):
    from services.deployer.handler import handle as deploy
    from skyfuse import contracts
    from skyfuse.runtime.function import Runtime, hosted, run_handler

    store = open_store(fleet.clouds["aws"].store)
    runtime = Runtime("gcp", "deployer", fleet)

    def decision(version, sequence):
        saved = store.put(f"runs/r1/fused/{version}.onnx", classifier(seed=len(version)))
        data = {**contracts.sample("placement.changed"), "decision_id": f"d-{version}", "sequence": sequence,
                "model_version": version, "model_uri": saved.uri, "sha256": saved.sha256, "source_cloud": "aws",
                "placements": [{"cloud": "gcp", "weight": 1.0, "replicas": 1}], "previous": []}
        with hosted(runtime):
            run_handler(deploy, signed_event("placement.changed", data, "aws/scheduler", fleet), runtime)

    decision("v-new", 12)
    decision("v-old", 11)  # redelivered from another partition, after the newer one
    pointer = orjson.loads(open_store(fleet.clouds["gcp"].store).get("serving/current.json"))
    assert pointer["version"] == "v-new"
    assert [e.get_data()["state"] for e in runtime.emitted] == ["deploying", "serving"]
