"""skyfuse.serving.prometheus: the metrics directory gunicorn's workers share, and the series a
request leaves (route template, status, latency)."""
import os

from prometheus_client.parser import text_string_to_metric_families

from skyfuse.serving import prometheus


def test_one_process_needs_no_directory():
    environ = {}
    assert prometheus.prepare_workers(1, environ) is None and environ == {}


def test_a_given_directory_is_emptied_of_an_earlier_run(tmp_path):
    (tmp_path / "counter_123.db").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("kept")
    environ = {prometheus.MULTIPROC_ENV: str(tmp_path)}
    assert prometheus.prepare_workers(4, environ) == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_a_request_is_counted_under_its_route_and_status():
    metrics = prometheus.Metrics()
    with metrics.track("/predict") as tracked:
        tracked.status = 400
    try:
        with metrics.track("/predict"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    text, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text.decode()) for s in f.samples}
    assert samples[("skyfuse_inference_requests_total", (("route", "/predict"), ("status", "400")))] == 1
    assert samples[("skyfuse_inference_requests_total", (("route", "/predict"), ("status", "500")))] == 1
    assert samples[("skyfuse_inference_request_duration_seconds_count", (("route", "/predict"),))] == 2
    assert samples[("skyfuse_inference_requests_in_flight", ())] == 0


def _samples(metrics):
    text, _ = metrics.exposition()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


def test_an_asgi_request_is_counted_before_its_last_chunk_leaves():
    """A client that has its whole answer and then reads /metrics finds its request and its bytes
    there: the host counts them before the last chunk is handed to the server, not after."""
    import asyncio

    from skyfuse.serving.asgi import noting_status, read_body, send_response

    metrics, seen = prometheus.Metrics(), []

    async def receive():
        return {"type": "http.request", "body": b"12345", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            seen.append(_samples(metrics))  # what a /metrics read would show right now

    async def streamed():  # an inner app's answer, in chunks, through noting_status
        with metrics.track("/predict") as tracked:
            await read_body(receive, 100, tracked)
            noted = noting_status(send, tracked)
            await noted({"type": "http.response.start", "status": 200, "headers": []})
            await noted({"type": "http.response.body", "body": b"ab", "more_body": True})
            await noted({"type": "http.response.body", "body": b"cde"})

    async def whole():  # a host's own answer, in one send_response
        with metrics.track("/predict") as tracked:
            await read_body(receive, 100, tracked)
            await send_response(send, 201, b"abcde", tracked=tracked)

    for request, status in ((streamed, "200"), (whole, "201")):
        before = _samples(metrics)
        asyncio.run(request())
        at_last_chunk = seen.pop()
        assert at_last_chunk[("skyfuse_inference_requests_total", (("route", "/predict"), ("status", status)))] == 1
        for direction in ("received", "sent"):
            key = ("skyfuse_inference_bytes_total", (("direction", direction),))
            assert at_last_chunk[key] - before.get(key, 0) == 5
        assert at_last_chunk[("skyfuse_inference_requests_in_flight", ())] == 0
        assert _samples(metrics) == at_last_chunk  # leaving the block counts nothing twice


def test_latency_buckets_take_a_value_on_their_bound():
    """Each request lands in the first bucket whose bound is >= its latency (Prometheus' `le`);
    the buckets are cumulative, `+Inf` is the count, and a scrape is not counted as traffic."""
    metrics = prometheus.Metrics()
    for seconds in (prometheus.BUCKETS[0], prometheus.BUCKETS[1] * 1.01, 11.0):
        tracker = metrics.track("/predict")
        tracker.received = 3
        metrics.series.ended(tracker, 200, seconds)  # as Tracker.finish does, with a latency of our choosing
    scrape = metrics.track("/metrics").__enter__()
    scrape.received, scrape.status = 7, 200
    scrape.finish()
    samples = _samples(metrics)

    def bucket(le: str) -> float:
        return samples[("skyfuse_inference_request_duration_seconds_bucket", (("le", le), ("route", "/predict")))]

    assert (bucket("5e-05"), bucket("0.0001"), bucket("0.00025"), bucket("10.0"), bucket("+Inf")) == (1, 1, 2, 2, 3)
    assert samples[("skyfuse_inference_request_duration_seconds_count", (("route", "/predict"),))] == 3
    total = samples[("skyfuse_inference_request_duration_seconds_sum", (("route", "/predict"),))]
    assert abs(total - (prometheus.BUCKETS[0] + prometheus.BUCKETS[1] * 1.01 + 11.0)) < 1e-9
    assert samples[("skyfuse_inference_bytes_total", (("direction", "received"),))] == 9  # not the scrape's 7
    assert samples[("skyfuse_inference_requests_total", (("route", "/metrics"), ("status", "200")))] == 1


def test_one_process_imports_prometheus_client_only_for_a_scrape():
    """Counting requests and models needs no prometheus_client (not on the way to a cold start's
    first answer); the first scrape imports it and writes everything counted."""
    import subprocess
    import sys

    script = """
import sys
from types import SimpleNamespace
from skyfuse.serving import prometheus
metrics = prometheus.Metrics()
with metrics.track("/predict") as tracked:
    tracked.status = 200
metrics.swapped(SimpleNamespace(version="v1"), None)
metrics.swapped(SimpleNamespace(version="v2"), SimpleNamespace(version="v1"))
metrics.load_failed()
before = "prometheus_client" in sys.modules
text = metrics.exposition()[0].decode()
print(before, "prometheus_client" in sys.modules)
print(text)
"""
    env = {k: v for k, v in os.environ.items() if k != prometheus.MULTIPROC_ENV}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    imported, text = out.stdout.split("\n", 1)
    assert imported == "False True"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("skyfuse_inference_model_info", (("version", "v1"),))] == 0
    assert samples[("skyfuse_inference_model_info", (("version", "v2"),))] == 1
    assert samples[("skyfuse_inference_model_load_failures_total", ())] == 1
    assert samples[("skyfuse_inference_requests_total", (("route", "/predict"), ("status", "200")))] == 1
