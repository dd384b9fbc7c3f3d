"""The function hosts' Prometheus metrics, scraped over HTTP and parsed with prometheus_client's own
parser: deliveries by result, retries, dead letters, invocation latency and the group's lag."""
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from skyfuse.dev.hosts import free_port
from skyfuse.runtime.metrics import HostMetrics
from tests.functions import probe_state
from tests.integration.test_host import Running, clean_probe, probe_invoker, publish, shard_event  # noqa: F401


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_deliveries_retries_dead_letters_latency_and_lag_are_exposed(bus, fleet, uid):
    topic = f"host-metrics-{uid}"
    bus.ensure_topics([topic], 1)
    bus.publish(topic, b"not an event", b"r1", [("ce_specversion", b"1.0")])
    for i in range(4):
        publish(bus, topic, shard_event(f"s{i}"))
    probe_state.FAILING["s1"] = 1  # fails once, then succeeds
    metrics, port = HostMetrics(), free_port()
    server, _ = metrics.serve(port)
    try:
        with Running(bus, fleet, "aws", topic, uid) as run:
            run.host.metrics = metrics
            metrics.watch([run.host])
            run.wait(lambda: len(run.results("ok")) == 4)
            run.wait(lambda: bus.committed(run.host.group, topic) == {0: 5})
            got = scrape(port)
    finally:
        server.shutdown()
    labels = (("cloud", "aws"), ("function", f"probe-{uid}"))
    assert got[("skyfuse_deliveries_total", (*labels, ("result", "ok")))] == 4
    assert got[("skyfuse_deliveries_total", (*labels, ("result", "retry")))] == 1
    assert got[("skyfuse_retries_total", labels)] == 1
    assert got[("skyfuse_dead_letters_total", labels)] == 1
    assert got[("skyfuse_invocation_seconds_count", labels)] >= 2  # the failed batch, then the rest
    assert got[("skyfuse_consumer_lag", (*labels, ("topic", topic)))] == 0
