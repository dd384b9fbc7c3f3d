"""The router function against LocalStack's Route 53: signed placement.changed events go through a
real function host (the AWS Lambda entry point behind its Kafka trigger, on the embedded bus), and
the weighted records LocalStack holds follow each new placement; a late decision leaves them as
they are; a forged or unsigned one is dead-lettered without touching them.

Needs LocalStack (`make emulators-up`; `$AWS_ENDPOINT_URL`, default http://127.0.0.1:4566): fails,
never skips, without it. Each test works in a hosted zone of its own, deleted afterwards."""
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from skyfuse import config, contracts, events, signing
from skyfuse.bus import open_bus
from skyfuse.dev import emulation
from skyfuse.dev.fleet import invoker_for
from skyfuse.runtime.host import FunctionHost
from skyfuse.storage import open_store
from tests.conftest import signed_event

pytestmark = pytest.mark.emulators
REPO = Path(__file__).resolve().parents[2]
LOCALSTACK = os.environ.get("AWS_ENDPOINT_URL", emulation.ENVIRONMENT["AWS_ENDPOINT_URL"])
HOSTS = {"aws": "aws.inference.skyfuse.test", "gcp": "gcp.inference.skyfuse.test",
         "azure": "azure.inference.skyfuse.test"}


@pytest.fixture
def route53(monkeypatch):
    parts = urlsplit(LOCALSTACK)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=2).close()
    except OSError as exc:
        pytest.fail(f"no LocalStack at {LOCALSTACK} ({exc}): start it with `make emulators-up` (`make test` does), "
                    "or point $AWS_ENDPOINT_URL at one", pytrace=False)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, emulation.ENVIRONMENT[name])
    import boto3

    return boto3.client("route53", endpoint_url=LOCALSTACK, region_name="us-east-1")


@pytest.fixture
def zone(route53, uid):
    name = f"t{uid}.skyfuse.test."
    zone_id = route53.create_hosted_zone(Name=name, CallerReference=f"skyfuse-test-{uid}")["HostedZone"]["Id"]
    yield name
    held = [r for r in route53.list_resource_record_sets(HostedZoneId=zone_id)["ResourceRecordSets"]
            if r["Type"] not in ("NS", "SOA")]
    if held:
        route53.change_resource_record_sets(HostedZoneId=zone_id, ChangeBatch={
            "Changes": [{"Action": "DELETE", "ResourceRecordSet": r} for r in held]})
    route53.delete_hosted_zone(Id=zone_id)


@pytest.fixture
def fleet(tmp_path, zone):
    env = {"SKYFUSE_SIGNING__KEYS_DIR": str(tmp_path / "keys"), "SKYFUSE_BUS__EMBEDDED__PATH": str(tmp_path / "bus"),
           "SKYFUSE_DELIVERY__BACKOFF_INITIAL_S": "0.01", "SKYFUSE_DELIVERY__BACKOFF_MAX_S": "0.05",
           "SKYFUSE_DNS__PROVIDER": "route53", "SKYFUSE_DNS__ZONE": zone, "SKYFUSE_DNS__RECORD": f"api.{zone}",
           "SKYFUSE_DNS__TTL": "30", "SKYFUSE_DNS__ENDPOINT_URL": LOCALSTACK}
    for cloud, host in HOSTS.items():
        env[f"SKYFUSE_CLOUDS__{cloud.upper()}__STORE"] = f"file://{tmp_path}/stores/{cloud}"
        env[f"SKYFUSE_CLOUDS__{cloud.upper()}__ENDPOINT"] = f"https://{host}/"
    fleet = config.load(environ=env)
    signing.ensure_local_keys(fleet)
    return fleet


def dns_weights(route53, fleet) -> dict[str, tuple[str, str, int, int]]:
    """What LocalStack holds at the record name: cloud → (type, value, weight, ttl)."""
    zone_id = route53.list_hosted_zones_by_name(DNSName=fleet.dns.zone, MaxItems="1")["HostedZones"][0]["Id"]
    sets = route53.list_resource_record_sets(HostedZoneId=zone_id)["ResourceRecordSets"]
    return {r["SetIdentifier"]: (r["Type"], r["ResourceRecords"][0]["Value"], r["Weight"], r["TTL"])
            for r in sets if r["Name"] == fleet.dns.record}


def expect(**weights):
    return {cloud: ("CNAME", host, weights.get(cloud, 0), 30) for cloud, host in HOSTS.items()}


class Router:
    """The aws router's function host in a thread, with every delivery it reports."""

    def __init__(self, fleet):
        self.fleet, self.bus = fleet, open_bus(fleet)
        self.deliveries = []
        self.host = FunctionHost(self.bus, fleet, "aws", "router", invoker_for(fleet, "aws", "router"),
                                 self.deliveries.append)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.host.run, args=(self.stop,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)
        self.bus.close()

    def place(self, sequence, by="aws/scheduler", sign=True, **weights):
        data = {**contracts.sample("placement.changed"), "sequence": sequence, "decision_id": f"d-{sequence}",
                "model_version": f"v{sequence}",  # another version: another partition, so order is not given
                "placements": [{"cloud": c, "weight": w, "replicas": 1 if w else 0} for c, w in weights.items()]}
        event = (signed_event("placement.changed", data, by, self.fleet) if sign else
                 events.new_event("placement.changed", data, source=signing.source_of(by)))
        key, value, headers = events.encode(event)
        self.bus.publish(contracts.event_type("placement.changed").topic, value, key, headers)
        return event["id"]

    def settled(self, event_id):
        return next((d for d in self.deliveries if d.event_id == event_id and d.result != "retry"), None)


def wait(condition, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_route53_records_follow_the_placement_and_never_roll_back(route53, fleet):
    with Router(fleet) as router:
        router.place(4, gcp=0.7, aws=0.3)
        wait(lambda: dns_weights(route53, fleet) == expect(aws=109, gcp=255), "the first placement in Route 53")
        router.place(6, azure=0.8, gcp=0.2)  # a move
        wait(lambda: dns_weights(route53, fleet) == expect(azure=255, gcp=64), "the move in Route 53")

        late = router.place(5, aws=1.0)  # decided before 6, delivered after it
        wait(lambda: router.settled(late), "the late decision to be handled")
        assert router.settled(late).result == "ok"
        assert dns_weights(route53, fleet) == expect(azure=255, gcp=64)

        forged = router.place(9, by="gcp/inference", aws=1.0)  # signed, but not by the control scheduler
        unsigned = router.place(10, sign=False, aws=1.0)
        wait(lambda: router.settled(forged) and router.settled(unsigned), "the forged decisions to be handled")
        assert {router.settled(forged).result, router.settled(unsigned).result} == {"rejected"}
        assert dns_weights(route53, fleet) == expect(azure=255, gcp=64)
        dead = {events.decode(r.key, r.value, r.headers)["id"]: dict(r.headers)["skyfuse_dlq_reason"].decode()
                for r in router.bus.read(contracts.dlq_topic("router"))}
        assert dead.keys() == {forged, unsigned}
        assert dead[forged].startswith("untrusted: ") and "gcp/inference" in dead[forged], dead[forged]
        assert dead[unsigned].startswith("untrusted: ") and "unsigned" in dead[unsigned], dead[unsigned]

        router.place(11, aws=1.0)  # and a genuine newer decision still moves it
        wait(lambda: dns_weights(route53, fleet) == expect(aws=255), "the newest placement in Route 53")
    recorded = open_store(fleet.clouds["aws"].store).list("router/dns")  # in the control store
    assert recorded == [f"router/dns/{fleet.dns.record.rstrip('.')}/{s:020d}.json" for s in (4, 6, 11)]


def test_the_emulated_fleet_sets_its_records_in_localstacks_route53(route53, tmp_path, uid, monkeypatch):
    """What `skyfuse up --emulate` runs: emulation.apply points the router at LocalStack's Route 53 and
    the zone `emulators.sh up` made, and keeps its decisions in LocalStack's S3 (the aws store)."""
    for name, value in emulation.ENVIRONMENT.items():
        monkeypatch.setenv(name, os.environ.get(name, value))  # what apply sets, undone afterwards
    assert emulation.apply(config.Fleet()).dns.record == f"api.{emulation.DNS_ZONE}"
    record = f"t{uid}.{emulation.DNS_ZONE}"  # a name of its own in the shared zone
    keys = {"SKYFUSE_SIGNING__KEYS_DIR": str(tmp_path / "keys"), "SKYFUSE_DNS__ZONE": emulation.DNS_ZONE,
            "SKYFUSE_DNS__RECORD": record}
    fleet = emulation.apply(config.load(environ=keys))
    assert (fleet.dns.provider, fleet.dns.endpoint_url, fleet.clouds["aws"].store) == (
        "route53", LOCALSTACK, emulation.STORES["aws"])
    found = route53.list_hosted_zones_by_name(DNSName=emulation.DNS_ZONE, MaxItems="1")["HostedZones"]
    assert found and found[0]["Name"] == emulation.DNS_ZONE, (
        f"no zone {emulation.DNS_ZONE} in LocalStack: `bash infra/emulators/emulators.sh up` creates it "
        f"(or `python infra/emulators/bootstrap.py --route53 {LOCALSTACK}`)")
    embedded = config.replace(fleet.bus, backend="embedded", embedded=config.replace(
        fleet.bus.embedded, path=str(tmp_path / "bus")))  # the bus is not what this test is about
    for cloud, settings in fleet.clouds.items():  # as `skyfuse up` sets them when its servers start
        settings.endpoint = f"http://127.0.0.1:{8101 + list(fleet.clouds).index(cloud)}"
    fleet = config.replace(fleet, bus=embedded)
    signing.ensure_local_keys(fleet)
    store = open_store(emulation.STORES["aws"])
    try:
        with Router(fleet) as router:
            router.place(1, aws=0.5, azure=0.5)
            wait(lambda: dns_weights(route53, fleet) == {c: ("A", "127.0.0.1", w, 60) for c, w in
                                                         (("aws", 255), ("gcp", 0), ("azure", 255))}, "records")
            router.place(2, gcp=1.0)
            wait(lambda: {c: w[2] for c, w in dns_weights(route53, fleet).items()}
                 == {"aws": 0, "gcp": 255, "azure": 0}, "the move")
        assert store.list(f"router/dns/{record.rstrip('.')}") == [
            f"router/dns/{record.rstrip('.')}/{s:020d}.json" for s in (1, 2)]
    finally:
        for key in store.list(f"router/dns/{record.rstrip('.')}"):
            store.delete(key)
        zone_id = found[0]["Id"]
        held = [r for r in route53.list_resource_record_sets(HostedZoneId=zone_id)["ResourceRecordSets"]
                if r["Name"] == record]
        if held:
            route53.change_resource_record_sets(HostedZoneId=zone_id, ChangeBatch={
                "Changes": [{"Action": "DELETE", "ResourceRecordSet": r} for r in held]})


@pytest.mark.kafka
def test_skyfuse_up_emulate_points_the_router_at_localstack(route53, tmp_path, uid, kafka_bootstrap):
    """The emulated run as a user starts it: `skyfuse up --emulate` on Kafka, then an operator's
    placement published with `skyfuse publish`; LocalStack's Route 53 records follow it."""
    import json
    import subprocess
    import sys

    from skyfuse.dev.hosts import free_port

    record = f"u{uid}.{emulation.DNS_ZONE}"
    env = {**os.environ, **emulation.ENVIRONMENT, "PYTHONPATH": str(REPO), "COLUMNS": "200",
           "SKYFUSE_BUS__KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "SKYFUSE_BUS__KAFKA__SESSION_TIMEOUT_MS": "6000",
           "SKYFUSE_DNS__ZONE": emulation.DNS_ZONE, "SKYFUSE_DNS__RECORD": record,
           **{f"SKYFUSE_CLOUDS__{c.upper()}__INFERENCE_PORT": str(free_port()) for c in HOSTS}}
    skyfuse = [sys.executable, "-m", "skyfuse.cli"]
    up = subprocess.Popen([*skyfuse, "up", "--emulate", "--function", "router", "--router-port", "0", "--for", "180"],
                          cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (zone,) = [z for z in route53.list_hosted_zones()["HostedZones"] if z["Name"] == emulation.DNS_ZONE]
    fleet = emulation.apply(config.load(environ={k: v for k, v in env.items() if k.startswith("SKYFUSE_")}))
    bus = open_bus(fleet)
    try:
        endpoints = tmp_path / ".skyfuse" / "endpoints.json"
        wait(lambda: up.poll() is None and endpoints.exists() and "gateways" in json.loads(endpoints.read_text()),
             "`skyfuse up --emulate` to start", timeout=120)
        topic = contracts.event_type("placement.changed").topic
        # the broker is shared: the router first goes through what other runs placed (then this one is the last)
        wait(lambda: bus.lag("aws.router", topic) == 0, "the aws router to catch up with the topic", timeout=120)
        placement = {**contracts.sample("placement.changed"), "decision_id": f"manual-{uid}", "trigger": "manual",
                     "placements": [{"cloud": "aws", "weight": 0.2, "replicas": 1},
                                    {"cloud": "gcp", "weight": 0.8, "replicas": 1}]}
        del placement["sequence"]  # an operator's decision, applied as it comes
        published = subprocess.run([*skyfuse, "publish", "placement.changed", "--data", json.dumps(placement),
                                    "--as", "aws/scheduler"], cwd=tmp_path,
                                   env={**env, "SKYFUSE_BUS__BACKEND": "kafka"},
                                   capture_output=True, text=True, timeout=120)
        assert published.returncode == 0, published.stderr

        def held():
            sets = route53.list_resource_record_sets(HostedZoneId=zone["Id"])["ResourceRecordSets"]
            return {r["SetIdentifier"]: (r["Type"], r["ResourceRecords"][0]["Value"], r["Weight"])
                    for r in sets if r["Name"] == record}

        wait(lambda: held() == {"aws": ("A", "127.0.0.1", 64), "gcp": ("A", "127.0.0.1", 255),
                                "azure": ("A", "127.0.0.1", 0)}, "Route 53 to follow the placement")
    finally:
        up.terminate()
        output, _ = up.communicate(timeout=60)
        bus.close()
        leftover = [r for r in route53.list_resource_record_sets(HostedZoneId=zone["Id"])["ResourceRecordSets"]
                    if r["Name"] == record]
        if leftover:
            route53.change_resource_record_sets(HostedZoneId=zone["Id"], ChangeBatch={
                "Changes": [{"Action": "DELETE", "ResourceRecordSet": r} for r in leftover]})
        store = open_store(emulation.STORES["aws"])
        for key in store.list(f"router/dns/{record.rstrip('.')}"):
            store.delete(key)
    assert up.returncode == 0, output
    assert any("aws" in line and "router" in line and "placement.changed" in line and " ok " in line
               for line in output.splitlines()), output[-3000:]
