"""Signed events (issue 10, items 1 and 2): every emitter signs, consumers verify the signer and
check that the catalog lets it emit the type, and what fails is refused with the reason."""
import os
import re
import stat
from datetime import UTC, datetime

import pytest
import time_machine
from cloudevents.conversion import to_binary as to_http_binary
from cloudevents.http import from_http

from skyfuse import config, contracts, events, signing
from skyfuse.runtime.function import Runtime, hosted, run_handler
from tests.conftest import keyed_fleet

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@pytest.fixture
def fleet(tmp_path):
    return keyed_fleet(tmp_path)


def make(fleet, type_name, by, data=None, **attrs):
    data = data or contracts.sample(type_name)
    event = events.new_event(type_name, data, source=signing.source_of(by), subject=data.get("cloud"), **attrs)
    return signing.load_signer(fleet.signing.keys_dir, by).sign(event)


def verify(fleet, event, now=None):
    ring = signing.keyring(fleet.signing.keys_dir)
    return ring.verify(event, max_age_s=fleet.signing.max_age_s, max_skew_s=fleet.signing.max_skew_s, now=now)


def test_a_signed_event_verifies_as_its_signer_after_every_way_it_travels(fleet):
    event = make(fleet, "placement.changed", "aws/scheduler")
    assert verify(fleet, event) == "aws/scheduler"
    key, value, headers = events.encode(event)  # Kafka, binary mode
    assert verify(fleet, events.decode(key, value, headers)) == "aws/scheduler"
    http_headers, body = to_http_binary(event)  # the CloudEvent a Cloud Run function gets
    assert verify(fleet, from_http(http_headers, body)) == "aws/scheduler"
    assert signing.check(fleet, event) == "aws/scheduler"


@pytest.mark.parametrize("change", [
    lambda e: e.get_data().__setitem__("model_uri", "file:///etc/hostname"),
    lambda e: e.get_data()["placements"][0].__setitem__("weight", 0.9),
    lambda e: e.__setitem__("id", "another-id"),
    lambda e: e.__setitem__("time", "2026-11-28T12:00:01.000Z"),
    lambda e: e.__setitem__("subject", "gcp"),
    lambda e: e.__setitem__("type", "skyfuse.fused.ready"),
])
def test_any_change_to_a_signed_event_breaks_its_signature(fleet, change):
    event = make(fleet, "placement.changed", "aws/scheduler")
    change(event)
    with pytest.raises(signing.Untrusted, match="bad signature for key aws.scheduler.*altered or forged"):
        verify(fleet, event)


def test_unsigned_and_unknown_keys_are_refused(fleet, tmp_path):
    plain = events.new_event("placement.changed", contracts.sample("placement.changed"), source="skyfuse://aws/scheduler")
    with pytest.raises(signing.Untrusted, match="unsigned"):
        verify(fleet, plain)
    other = config.load(environ={"SKYFUSE_SIGNING__KEYS_DIR": str(tmp_path / "elsewhere")})
    signing.ensure_local_keys(other)  # an attacker's own keys, named like ours
    with pytest.raises(signing.Untrusted, match="does not list"):
        verify(fleet, make(other, "placement.changed", "aws/scheduler"))


def test_a_signer_cannot_claim_another_source(fleet):
    """A compromised inference function signs with its own key but claims to be the scheduler."""
    data = contracts.sample("placement.changed")
    event = events.new_event("placement.changed", data, source="skyfuse://aws/scheduler")
    signing.load_signer(fleet.signing.keys_dir, "aws/inference").sign(event)
    with pytest.raises(signing.Untrusted, match=r"source 'skyfuse://aws/scheduler' is not its signer's \(skyfuse://aws/inference\)"):
        verify(fleet, event)


def test_an_event_replayed_after_max_age_or_signed_in_the_future_is_refused(fleet):
    with time_machine.travel(T0, tick=False):
        event = make(fleet, "placement.changed", "aws/scheduler")
    start = T0.timestamp()
    assert verify(fleet, event, now=start + fleet.signing.max_age_s - 1) == "aws/scheduler"
    with pytest.raises(signing.Untrusted, match="refused as a replay"):
        verify(fleet, event, now=start + fleet.signing.max_age_s + 1)
    with pytest.raises(signing.Untrusted, match="in the future"):
        verify(fleet, event, now=start - fleet.signing.max_skew_s - 1)


@pytest.mark.parametrize("type_name, by, data_changes, refusal", [
    ("placement.changed", "aws/scheduler", {}, None),
    ("placement.changed", "aws/inference", {},
     "aws/inference may not emit placement.changed: events/catalog.toml allows only scheduler@control"),
    ("placement.changed", "gcp/scheduler", {}, "only the control cloud's (aws) scheduler may"),
    ("placement.changed", "cli", {}, "cli may not emit placement.changed"),
    ("fused.ready", "aws/fuser", {"cloud": "aws"}, None),
    ("fused.ready", "gcp/fuser", {"cloud": "gcp"}, "only the control cloud's (aws) fuser may"),
    ("metrics.sampled", "gcp/inference", {"cloud": "gcp"}, None),
    ("metrics.sampled", "gcp/monitor", {"cloud": "gcp"}, None),
    ("metrics.sampled", "gcp/inference", {"cloud": "aws"}, "gcp/inference may not speak for cloud 'aws'"),
    ("model.ready", "azure/trainer", {"cloud": "gcp"}, "azure/trainer may not speak for cloud 'gcp'"),
    ("shard.ready", "cli", {}, None),
    ("shard.ready", "aws/trainer", {}, "aws/trainer may not emit shard.ready"),
    ("deployment.status", "gcp/deployer", {"cloud": "gcp"}, None),
])
def test_the_catalog_says_who_may_emit_what(fleet, type_name, by, data_changes, refusal):
    event = make(fleet, type_name, by, {**contracts.sample(type_name), **data_changes})
    if refusal is None:
        assert signing.check(fleet, event) == by
    else:
        with pytest.raises(signing.Untrusted, match=re.escape(refusal)):
            signing.check(fleet, event)


def test_a_forged_placement_is_dead_lettered_and_never_acted_on(fleet):
    """Through the path every entry point takes (run_handler): nothing reaches the handler."""
    from skyfuse.bus import open_bus

    acted = []
    bus = open_bus(fleet)
    runtime = Runtime("gcp", "deployer", fleet, bus_factory=lambda: bus)
    forged = make(fleet, "placement.changed", "gcp/inference")
    unsigned = events.new_event("placement.changed", contracts.sample("placement.changed"), source="skyfuse://aws/scheduler")
    with hosted(runtime):
        for event in (forged, unsigned):
            run_handler(lambda e, r: acted.append(e), event, runtime)
    assert acted == []
    with bus.consumer("t", ["deployer.dlq"]) as consumer:
        letters = consumer.poll(5.0, 10)
    reasons = [dict(r.headers)["skyfuse_dlq_reason"].decode() for r in letters]
    assert reasons == ["untrusted: gcp/inference may not emit placement.changed: events/catalog.toml allows only "
                       "scheduler@control", "untrusted: unsigned: no signature/signaturekeyid attributes; with "
                       "signing on, every event must be signed by its producer's key"]
    bus.close()


def test_emit_signs_with_the_functions_own_key(fleet):
    from skyfuse.bus import open_bus

    bus = open_bus(fleet)
    runtime = Runtime("aws", "scheduler", fleet, bus_factory=lambda: bus)
    event = runtime.emit("placement.changed", contracts.sample("placement.changed"))
    assert event[signing.KEY_ID].startswith("aws.scheduler.")
    assert signing.check(fleet, event) == "aws/scheduler"
    bus.close()


def test_rotation_keeps_old_signatures_valid_until_the_old_key_is_retired(fleet):
    keys = fleet.signing.keys_dir
    before = make(fleet, "placement.changed", "aws/scheduler")
    new_id = signing.rotate(keys, "aws/scheduler")
    after = make(fleet, "placement.changed", "aws/scheduler")
    assert after[signing.KEY_ID] == new_id != before[signing.KEY_ID]
    assert verify(fleet, before) == verify(fleet, after) == "aws/scheduler"
    signing.retire(keys, before[signing.KEY_ID])
    with pytest.raises(signing.Untrusted, match="does not list"):
        verify(fleet, before)
    assert verify(fleet, after) == "aws/scheduler"
    with pytest.raises(signing.KeySetupError, match="no key"):
        signing.retire(keys, before[signing.KEY_ID])


def test_private_keys_are_private_and_init_makes_only_what_is_missing(fleet):
    keys = fleet.signing.keys_dir
    pem = os.path.join(keys, "private", "aws.scheduler.pem")
    assert stat.S_IMODE(os.stat(pem).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(pem)).st_mode) == 0o700
    assert len(signing.trusted(keys)) == 3 * len(config.FUNCTIONS) + 1
    assert signing.ensure_local_keys(fleet) == []


def test_a_cloud_function_takes_its_key_from_the_environment(fleet):
    pem = open(os.path.join(fleet.signing.keys_dir, "private", "gcp.deployer.pem")).read()
    os.remove(os.path.join(fleet.signing.keys_dir, "private", "gcp.deployer.pem"))
    with pytest.raises(signing.KeySetupError, match="gcp/deployer has no key.*SKYFUSE_SIGNING_KEY is unset"):
        signing.load_signer(fleet.signing.keys_dir, "gcp/deployer", environ={})
    signer = signing.load_signer(fleet.signing.keys_dir, "gcp/deployer", environ={signing.ENV_KEY: pem})
    assert signer.id.startswith("gcp.deployer.")
    with pytest.raises(signing.KeySetupError, match="SKYFUSE_SIGNING_KEY.* is not a PEM private key"):
        signing.load_signer(fleet.signing.keys_dir, "gcp/deployer", environ={signing.ENV_KEY: "not a key"})
    # an Azure function app: every function in one environment, each key under its function's name
    shared = {"SKYFUSE_SIGNING_KEY_DEPLOYER": pem, signing.ENV_KEY: "another function's key"}
    assert signing.load_signer(fleet.signing.keys_dir, "gcp/deployer", environ=shared).id == signer.id
    assert config.load(environ=shared).signing.enabled  # neither is read as a config key
    # the variable is not read as a config key, and its value never reaches a log line
    assert config.load(environ={signing.ENV_KEY: pem}).signing.enabled
    from skyfuse.redact import redact

    assert pem.strip().splitlines()[1] not in redact(f"oops {pem}", environ={signing.ENV_KEY: pem})


def test_a_key_the_trust_file_does_not_list_is_refused_when_loaded(fleet, tmp_path):
    other = config.load(environ={"SKYFUSE_SIGNING__KEYS_DIR": str(tmp_path / "other")})
    signing.ensure_local_keys(other)
    pem = open(os.path.join(other.signing.keys_dir, "private", "aws.scheduler.pem")).read()
    with pytest.raises(signing.KeySetupError, match="is not in .*trust.json: every consumer would refuse"):
        signing.load_signer(fleet.signing.keys_dir, "aws/scheduler", environ={signing.ENV_KEY: pem})


def test_missing_trust_file_says_what_to_run(tmp_path):
    with pytest.raises(signing.KeySetupError, match="run `skyfuse keys init`"):
        signing.keyring(tmp_path / "none")


def test_signing_off_neither_signs_nor_checks(tmp_path):
    fleet = config.load(environ={"SKYFUSE_SIGNING__ENABLED": "false", "SKYFUSE_SIGNING__KEYS_DIR": str(tmp_path / "k")})
    assert signing.signer_for(fleet, "aws/scheduler") is None
    plain = events.new_event("placement.changed", contracts.sample("placement.changed"), source="skyfuse://x")
    assert signing.check(fleet, plain) is None

