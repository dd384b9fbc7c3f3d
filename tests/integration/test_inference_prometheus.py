"""GET /metrics on each cloud's inference host, parsed by prometheus_client's own parser: requests by
route and status, the latency histogram, requests in flight, the model version served and failed
loads reflect exactly what was done; under gunicorn with two workers any scrape counts both."""
from __future__ import annotations

import http.client
import time
from urllib.parse import urlsplit

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from skyfuse.dev import hosts
from skyfuse.serving import testing
from skyfuse.serving.model import POINTER_KEY, Pointer, model_key, publish
from skyfuse.storage import open_store
from tests.integration.test_inference_hosts import host_env

ROW = [5.1, 3.5, 1.4, 0.2]
INFER = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": ROW}]}


def call(url: str, method: str, path: str, body: dict | bytes | None = None) -> tuple[int, bytes, str]:
    """One request on a fresh connection (so gunicorn's workers share them out)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    if isinstance(body, dict):
        body = orjson.dumps(body)
    conn.request(method, parts.path + path, body=body, headers={"Content-Type": "application/json"} if body else {})
    response = conn.getresponse()
    out = response.read()
    conn.close()
    return response.status, out, response.getheader("content-type") or ""


def scrape(url: str) -> dict[tuple, float]:
    """{(sample name, (sorted labels)): value} of one GET /metrics."""
    status, text, content_type = call(url, "GET", "/metrics")
    assert status == 200 and content_type.startswith("text/plain"), (status, text[:300])
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def requests(samples, route: str, status: int) -> float:
    return samples.get(("skyfuse_inference_requests_total", (("route", route), ("status", str(status)))), 0.0)


def latency_count(samples, route: str) -> float:
    return samples.get(("skyfuse_inference_request_duration_seconds_count", (("route", route),)), 0.0)


def model_info(samples) -> dict[str, float]:
    return {dict(labels)["version"]: v for (name, labels), v in samples.items()
            if name == "skyfuse_inference_model_info"}


@pytest.fixture(scope="module", params=hosts.PROVIDERS)
def served(request, tmp_path_factory):
    provider = request.param
    root = tmp_path_factory.mktemp(f"prometheus-{provider}")
    store_uri, env = host_env(provider, root, INFERENCE_METRICS_S="0", INFERENCE_RETRY_FAILED_S="0.2")
    store = open_store(store_uri)
    publish(store, "v1", testing.classifier(seed=1))
    host = hosts.start(provider, env=env, log_dir=root)
    try:
        yield host, store
    finally:
        host.stop()


def test_requests_latency_and_in_flight_are_counted(served):
    host, _ = served
    before = scrape(host.url)
    for _ in range(3):
        assert call(host.url, "POST", "/predict", {"instances": [ROW]})[0] == 200
    assert call(host.url, "POST", "/predict", {"instances": [[1, 2]]})[0] == 400
    assert call(host.url, "POST", "/v2/models/skyfuse/infer", INFER)[0] == 200
    assert call(host.url, "GET", "/v2/models/other/ready")[0] == 404
    assert call(host.url, "GET", "/wp-login.php")[0] == 404
    after = scrape(host.url)

    def added(f, *args):
        return f(after, *args) - f(before, *args)

    assert added(requests, "/predict", 200) == 3 and added(requests, "/predict", 400) == 1
    assert added(requests, "/v2/models/{name}/infer", 200) == 1
    assert added(requests, "/v2/models/{name}/ready", 404) == 1
    assert added(requests, "unmatched", 404) == 1  # any other path: one series, whatever was asked
    assert added(requests, "/metrics", 200) == 1  # the first scrape, counted once it was answered
    assert added(latency_count, "/predict") == 4
    assert 0 < after[("skyfuse_inference_request_duration_seconds_sum", (("route", "/predict"),))] < 4
    assert after[("skyfuse_inference_requests_in_flight", ())] == 1  # the scrape itself
    assert model_info(after) == {"v1": 1.0}
    assert after[("skyfuse_inference_model_load_failures_total", ())] == 0


def test_model_version_and_load_failures(served):
    host, store = served
    info = store.put(model_key("broken"), b"not an onnx model" * 10)
    store.put(POINTER_KEY, Pointer("broken", info.uri, info.sha256).to_json())
    deadline = time.monotonic() + 15
    while scrape(host.url)[("skyfuse_inference_model_load_failures_total", ())] < 2:  # tried, then retried
        assert time.monotonic() < deadline, "no load failure counted within 15 s"
        time.sleep(0.1)
    publish(store, "v2", testing.classifier(seed=2))
    while model_info(scrape(host.url)) != {"v1": 0.0, "v2": 1.0}:
        assert time.monotonic() < deadline, f"v2 not shown as served: {model_info(scrape(host.url))}"
        time.sleep(0.05)


def test_gunicorn_workers_add_up(tmp_path):
    """WORKERS=2: requests land on both workers (their pids in /health), and every scrape, whichever
    worker answers it, counts all of them. An earlier run's files in the metrics directory are gone."""
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"left by an earlier run")
    store_uri, env = host_env("gcp", tmp_path, INFERENCE_METRICS_S="0", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    publish(open_store(store_uri), "v1", testing.classifier(seed=1))
    host = hosts.start("gcp", env=env, workers=2, log_dir=tmp_path)
    try:
        assert not (metrics_dir / "counter_999999.db").exists()
        pids, predicts = set(), 0
        while len(pids) < 2 or predicts < 10:
            assert predicts < 300, f"only worker(s) {pids} answered 300 requests"
            assert call(host.url, "POST", "/predict", {"instances": [ROW]})[0] == 200
            predicts += 1
            pids.add(orjson.loads(call(host.url, "GET", "/health")[1])["pid"])
        assert call(host.url, "POST", "/predict", b"[]")[0] == 400
        for _ in range(6):  # each scrape lands on either worker
            samples = scrape(host.url)
            assert requests(samples, "/predict", 200) == predicts, samples
            assert requests(samples, "/predict", 400) == 1
            assert latency_count(samples, "/predict") == predicts + 1
            assert requests(samples, "/health", 200) == predicts + 1  # and hosts.start's readiness probe
            assert samples[("skyfuse_inference_requests_in_flight", ())] == 1
            assert model_info(samples) == {"v1": 1.0}
        assert pids <= {int(p.stem.rsplit("_", 1)[1]) for p in metrics_dir.glob("counter_*.db")}  # one file each
    finally:
        host.stop()
