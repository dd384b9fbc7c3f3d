"""The router's core (services/router/handler.py) against an in-memory DNS backend: it follows
newer decisions, never rolls back to an older one, converges when two routers write at once, and
says why it skips or refuses."""
import pytest

from services.router import handler
from skyfuse import config, contracts, events
from skyfuse.dns.records import Change, Record
from skyfuse.runtime.function import Rejected, Runtime

NAME = "api.skyfuse.example."


class MemoryDns:
    """Weighted records of one name, changed in atomic batches (Route 53's contract)."""

    def __init__(self):
        self.held: dict[tuple[str, str], Record] = {}
        self.batches: list[list[Change]] = []
        self.before_read = None  # a hook: what happens between a router's check and its write

    def records(self, name):
        if self.before_read:
            hook, self.before_read = self.before_read, None
            hook()
        return [r for r in self.held.values() if r.name == name]

    def apply(self, changes):
        self.batches.append(changes)
        for change in changes:
            if change.action == "DELETE":
                del self.held[change.record.key]
            else:
                self.held[change.record.key] = change.record

    def weights(self):
        return {r.set_id: r.weight for r in self.held.values()}


@pytest.fixture
def dns(monkeypatch):
    memory = MemoryDns()
    monkeypatch.setattr(handler, "open_backend", lambda settings: memory)
    return memory


def make_fleet(tmp_path, **extra):
    clouds = ("aws", "gcp", "azure")
    env = {f"SKYFUSE_CLOUDS__{c.upper()}__STORE": f"file://{tmp_path}/stores/{c}" for c in clouds}
    env.update({f"SKYFUSE_CLOUDS__{c.upper()}__ENDPOINT": f"https://{c}.skyfuse.example" for c in clouds})
    env.update({"SKYFUSE_DNS__PROVIDER": "route53", "SKYFUSE_DNS__ZONE": "skyfuse.example.",
                "SKYFUSE_DNS__RECORD": NAME})
    env.update(extra)
    return config.load(environ=env)


def placement(sequence, **by_cloud):
    data = {**contracts.sample("placement.changed"), "decision_id": f"d-{sequence}",
            "placements": [{"cloud": c, "weight": w, "replicas": 1 if w else 0} for c, w in by_cloud.items()]}
    if sequence is None:
        del data["sequence"]
    else:
        data["sequence"] = sequence
    return events.new_event("placement.changed", data, source="skyfuse://aws/scheduler")


@pytest.fixture
def runtime(tmp_path):
    return Runtime("aws", "router", make_fleet(tmp_path))


@pytest.fixture
def notes(caplog):
    caplog.set_level("INFO")
    return lambda: [r.getMessage() for r in caplog.records if r.name.startswith("skyfuse.")]


def test_follows_newer_decisions_and_skips_older_ones(runtime, dns, notes):
    handler.handle(placement(5, gcp=0.7, aws=0.3), runtime)
    assert dns.weights() == {"aws": 109, "gcp": 255, "azure": 0}
    assert {r.type for r in dns.held.values()} == {"CNAME"}
    assert dns.held[("CNAME", "gcp")].value == "gcp.skyfuse.example"
    handler.handle(placement(7, azure=1.0), runtime)  # a move
    assert dns.weights() == {"aws": 0, "gcp": 0, "azure": 255}
    writes = len(dns.batches)
    handler.handle(placement(6, aws=1.0), runtime)  # late: decided before 7
    assert dns.weights() == {"aws": 0, "gcp": 0, "azure": 255} and len(dns.batches) == writes
    assert "skipped: superseded by decision d-7 (scheduler sequence 7 > 6); DNS unchanged" in notes()
    handler.handle(placement(7, azure=1.0), runtime)  # a redelivery: the same values again
    assert dns.weights() == {"aws": 0, "gcp": 0, "azure": 255} and len(dns.batches) == writes + 1
    assert any(n.startswith(f"dns {NAME} ← aws 0, gcp 0, azure 255 (CNAME ") and n.endswith("sequence 7")
               for n in notes())


def test_when_an_older_decision_is_written_last_the_newer_one_is_put_back(tmp_path, dns, notes):
    fleet = make_fleet(tmp_path)
    slow, fast = Runtime("aws", "router", fleet), Runtime("aws", "router", fleet)  # two instances, one store
    dns.before_read = lambda: handler.handle(placement(9, gcp=1.0), fast)  # 9 lands while 8 is being written
    handler.handle(placement(8, aws=1.0), slow)
    assert dns.weights() == {"aws": 0, "gcp": 255, "azure": 0}  # 8 was written after 9, then 9 again
    assert [{c.record.set_id: c.record.weight for c in b} for b in dns.batches] == [
        {"aws": 0, "gcp": 255, "azure": 0}, {"aws": 255, "gcp": 0, "azure": 0}, {"aws": 0, "gcp": 255, "azure": 0}]
    assert any("then decision d-9 (sequence 9), newer, put back" in n for n in notes())


def test_only_the_last_decisions_are_remembered(runtime, dns):
    for sequence in range(1, 15):
        handler.handle(placement(sequence, aws=1.0), runtime)
    kept = runtime.store().list(f"router/dns/{NAME.rstrip('.')}")
    assert len(kept) == handler.KEEP and kept[-1].endswith(f"{14:020d}.json")


def test_a_decision_without_sequence_is_applied_as_it_comes(runtime, dns, notes):
    handler.handle(placement(4, aws=1.0), runtime)
    handler.handle(placement(None, gcp=1.0), runtime)  # an operator's
    assert dns.weights() == {"aws": 0, "gcp": 255, "azure": 0}
    assert any("(no sequence: an operator's decision, applied as it comes)" in n for n in notes())


def test_skips_without_a_zone_and_outside_the_control_cloud(tmp_path, dns, notes):
    handler.handle(placement(1, aws=1.0), Runtime("aws", "router", make_fleet(tmp_path, SKYFUSE_DNS__PROVIDER="none")))
    handler.handle(placement(1, aws=1.0), Runtime("gcp", "router", make_fleet(tmp_path)))
    assert dns.batches == []
    assert "skipped: no DNS zone configured ([dns] provider is none)" in notes()
    assert f"skipped: the control cloud's router (aws) sets {NAME}" in notes()


def test_a_placement_that_cannot_become_records_is_refused_with_the_key(tmp_path, dns):
    runtime = Runtime("aws", "router", make_fleet(tmp_path, SKYFUSE_CLOUDS__GCP__ENDPOINT=""))
    with pytest.raises(Rejected, match=rf"dns {NAME}: .*clouds\.gcp\.endpoint .* empty"):
        handler.handle(placement(3, gcp=1.0), runtime)
    assert dns.batches == [] and runtime.store().list(handler.APPLIED) == []  # nothing recorded either
