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

    from skyfuse.serving.asgi import counting, noting_status

    metrics, seen = prometheus.Metrics(), []

    async def receive():
        return {"type": "http.request", "body": b"12345", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            seen.append(_samples(metrics))  # what a /metrics read would show right now

    async def request():
        with metrics.track("/predict") as tracked:
            await counting(receive, tracked)()
            noted = noting_status(send, tracked)
            await noted({"type": "http.response.start", "status": 200, "headers": []})
            await noted({"type": "http.response.body", "body": b"ab", "more_body": True})
            await noted({"type": "http.response.body", "body": b"cde"})

    asyncio.run(request())
    (at_last_chunk,) = seen
    assert at_last_chunk[("skyfuse_inference_requests_total", (("route", "/predict"), ("status", "200")))] == 1
    assert at_last_chunk[("skyfuse_inference_bytes_total", (("direction", "received"),))] == 5
    assert at_last_chunk[("skyfuse_inference_bytes_total", (("direction", "sent"),))] == 5
    assert at_last_chunk[("skyfuse_inference_requests_in_flight", ())] == 0
    assert _samples(metrics) == at_last_chunk  # leaving the block counts nothing twice
