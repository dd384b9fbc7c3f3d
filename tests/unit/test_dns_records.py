"""From a placement to Route 53 weighted records (skyfuse.dns.records), and the `[dns]` config."""
import pytest

from skyfuse import config
from skyfuse.dns.records import MAX_WEIGHT, Change, DnsError, Record, changes, target, wanted, weights

CLOUDS = ["aws", "gcp", "azure"]
NAME = "api.skyfuse.example."


def placed(**by_cloud):
    return [{"cloud": c, "weight": w, "replicas": 1 if w else 0} for c, w in by_cloud.items()]


def test_the_heaviest_cloud_gets_255_and_the_others_keep_their_ratio():
    assert weights(placed(gcp=0.7, aws=0.3), CLOUDS) == {"aws": 109, "gcp": 255, "azure": 0}
    assert weights(placed(aws=0.5, gcp=0.5), CLOUDS) == {"aws": 255, "gcp": 255, "azure": 0}
    assert weights(placed(aws=1.0), CLOUDS) == {"aws": 255, "gcp": 0, "azure": 0}


def test_a_placed_cloud_never_rounds_to_zero_and_an_unplaced_one_is_zero():
    got = weights(placed(aws=0.999, gcp=0.0009, azure=0.0), CLOUDS)
    assert got == {"aws": 255, "gcp": 1, "azure": 0}
    assert all(0 <= w <= MAX_WEIGHT and isinstance(w, int) for w in got.values())


def test_clouds_the_placement_does_not_name_get_zero_and_unknown_clouds_are_ignored():
    assert weights(placed(gcp=0.6, elsewhere=0.4), CLOUDS) == {"aws": 0, "gcp": 255, "azure": 0}


def test_a_placement_with_no_configured_cloud_placed_is_refused():
    with pytest.raises(DnsError, match=r"no configured cloud \(aws, gcp, azure\) has weight.*placed: elsewhere"):
        weights(placed(aws=0.0, elsewhere=1.0), CLOUDS)


@pytest.mark.parametrize("endpoint, expected", [
    ("http://127.0.0.1:8101", ("A", "127.0.0.1")),
    ("http://[::1]:8103/api", ("AAAA", "::1")),
    ("https://Abc.lambda-url.us-east-1.on.aws/", ("CNAME", "abc.lambda-url.us-east-1.on.aws")),
    ("https://skyfuse-inference-123.us-central1.run.app", ("CNAME", "skyfuse-inference-123.us-central1.run.app")),
])
def test_the_target_is_the_endpoints_host(endpoint, expected):
    assert target(endpoint) == expected


@pytest.mark.parametrize("endpoint", ["127.0.0.1:8101", "not a url", "http://"])
def test_an_endpoint_without_a_host_is_refused(endpoint):
    with pytest.raises(DnsError, match="has no host"):
        target(endpoint)


def test_one_weighted_record_per_cloud_with_an_endpoint():
    endpoints = {"aws": "http://127.0.0.1:8101", "gcp": "http://127.0.0.1:8102", "azure": "http://127.0.0.1:8103/api"}
    got = wanted(placed(aws=0.25, gcp=0.75), endpoints, NAME, 30)
    assert got == [Record(NAME, "A", "aws", 85, "127.0.0.1", 30), Record(NAME, "A", "gcp", 255, "127.0.0.1", 30),
                   Record(NAME, "A", "azure", 0, "127.0.0.1", 30)]


def test_a_placed_cloud_without_endpoint_names_the_key_to_set():
    endpoints = {"aws": "http://127.0.0.1:8101", "gcp": "", "aws-eu": ""}
    with pytest.raises(DnsError, match=r"no endpoint to point DNS at: "
                                       r"clouds\.gcp\.endpoint \(SKYFUSE_CLOUDS__GCP__ENDPOINT\) empty; set it"):
        wanted(placed(aws=0.5, gcp=0.5), endpoints, NAME, 60)
    # an unplaced cloud without endpoint simply has no record
    assert [r.set_id for r in wanted(placed(aws=1.0), endpoints, NAME, 60)] == ["aws"]


def test_host_names_and_addresses_cannot_share_one_name():
    endpoints = {"aws": "https://a.example.com", "gcp": "http://10.0.0.2", "azure": "https://c.example.com"}
    with pytest.raises(DnsError, match=r"clouds\.aws\.endpoint, clouds\.azure\.endpoint name a host but "
                                       r"clouds\.gcp\.endpoint an IP address"):
        wanted(placed(aws=1.0), endpoints, NAME, 60)


def test_changes_upsert_every_wanted_record_and_delete_stale_ones_first():
    old_gcp = Record(NAME, "A", "gcp", 255, "10.0.0.2", 60)  # gcp moved from an address to a host name
    gone = Record(NAME, "CNAME", "azure-west", 3, "w.example.com", 60)  # a cloud no longer configured
    aws = Record(NAME, "CNAME", "aws", 10, "a.example.com", 60)
    want = [Record(NAME, "CNAME", "aws", 255, "a.example.com", 60),
            Record(NAME, "CNAME", "gcp", 0, "g.example.com", 60)]
    assert changes([aws, old_gcp, gone], want) == [Change("DELETE", old_gcp), Change("DELETE", gone),
                                                   Change("UPSERT", want[0]), Change("UPSERT", want[1])]
    assert changes(want, want) == [Change("UPSERT", r) for r in want]  # a redelivery rewrites the same values


def test_dns_config_is_checked_and_names_the_key():
    fleet = config.load(environ={"SKYFUSE_DNS__PROVIDER": "route53", "SKYFUSE_DNS__ZONE": "Skyfuse.Example",
                                 "SKYFUSE_DNS__RECORD": "api.skyfuse.example"})
    assert (fleet.dns.zone, fleet.dns.record, fleet.dns.ttl) == ("skyfuse.example.", "api.skyfuse.example.", 60)
    assert config.Fleet().dns.provider == "none"
    bad = {"SKYFUSE_DNS__PROVIDER": "route53"}
    with pytest.raises(config.ConfigError, match=r"dns: record is empty: set it.*zone and hosted_zone_id are both"):
        config.load(environ=bad)
    with pytest.raises(config.ConfigError, match=r"dns: record 'api\.other\.example\.' is not inside zone"):
        config.load(environ={**bad, "SKYFUSE_DNS__ZONE": "skyfuse.example.",
                             "SKYFUSE_DNS__RECORD": "api.other.example"})
    with pytest.raises(config.ConfigError, match=r"dns: record 'api\.\.x' is not a DNS name"):
        config.load(environ={**bad, "SKYFUSE_DNS__HOSTED_ZONE_ID": "Z1", "SKYFUSE_DNS__RECORD": "api..x"})
    with pytest.raises(config.ConfigError, match=r"unknown key 'dns\.recrod'; did you mean 'record'"):
        config.load(environ={"SKYFUSE_DNS__RECROD": "x"})
    with pytest.raises(config.ConfigError, match=r"dns\.provider: must be 'none' or 'route53' \(got 'cloudflare'\)"):
        config.load(environ={"SKYFUSE_DNS__PROVIDER": "cloudflare"})
