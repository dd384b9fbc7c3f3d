"""Inference behind each cloud's real HTTP server on 127.0.0.1 (skyfuse.dev.hosts): uvicorn with
Powertools' HttpResolverLocal (AWS), functions-framework's gunicorn (Google Cloud), uvicorn with the
Azure Functions HTTP adapter (Azure). Every test runs against all three servers."""
from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import orjson
import pytest

from skyfuse import config, contracts
from skyfuse.bus import open_bus
from skyfuse.dev import hosts
from skyfuse.serving import testing
from skyfuse.serving.model import POINTER_KEY, Pointer, model_key, publish
from skyfuse.storage import open_store, sha256_of
from tests.unit.test_inference_api import BAD_CASES

ROWS = np.random.default_rng(11).normal(size=(8, 4)).astype(np.float32) * 2


class Client:
    """One persistent HTTP/1.1 connection to a host."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.port, self.base = parts.port, parts.path
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def call(self, method: str, path: str, body: bytes | dict | None = None):
        if isinstance(body, dict):
            body = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        self.conn.request(method, self.base + path, body=body, headers=headers)
        response = self.conn.getresponse()
        raw = response.read()
        return response.status, (orjson.loads(raw) if raw else None), response

    def close(self):
        self.conn.close()


@dataclass
class Served:
    provider: str
    host: hosts.Host
    store: object
    bus_path: str
    models: dict[str, bytes] = field(default_factory=dict)  # every version published
    before: dict = field(default_factory=dict)  # answers before any model was published

    def publish(self, version: str, data: bytes):
        self.models[version] = data
        return publish(self.store, version, data)

    def wait_for(self, predicate, what: str, timeout_s: float = 15.0):
        client = Client(self.host.url)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                _, doc, _ = client.call("GET", "/health")
                if predicate(doc):
                    return doc
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.provider}: {what} not seen within {timeout_s} s; /health: {doc}")
                time.sleep(0.03)
        finally:
            client.close()

    def wait_for_version(self, version: str):
        return self.wait_for(lambda d: d["model_version"] == version, f"model {version} served")

    def current(self) -> str:
        return self.wait_for(lambda d: d["model_version"] is not None, "a model")["model_version"]


def host_env(provider: str, root, **extra: str) -> tuple[str, dict[str, str]]:
    """(store URI, environment) of an inference host of `provider` whose files live under `root`."""
    (root / "skyfuse.toml").write_text("")  # the defaults, whatever the working directory holds
    store_uri = f"file://{root}/store"
    env = {"SKYFUSE_CONFIG": str(root / "skyfuse.toml"), "SKYFUSE_CLOUD": provider,
           f"SKYFUSE_CLOUDS__{provider.upper()}__STORE": store_uri,
           "SKYFUSE_BUS__BACKEND": "embedded", "SKYFUSE_BUS__EMBEDDED__PATH": str(root / "bus"),
           "INFERENCE_POLL_S": "0.05", "WORKERS": "1", **extra}
    return store_uri, env


@pytest.fixture(scope="module", params=hosts.PROVIDERS)
def served(request, tmp_path_factory):
    provider = request.param
    root = tmp_path_factory.mktemp(f"inference-{provider}")
    store_uri, env = host_env(provider, root, INFERENCE_RETRY_FAILED_S="0.3", INFERENCE_METRICS_S="0.5")
    host = hosts.start(provider, env=env, log_dir=root)
    s = Served(provider, host, open_store(store_uri), str(root / "bus"))
    try:
        client = Client(host.url)
        s.before = {"predict": client.call("POST", "/predict", {"instances": [[1, 2, 3, 4]]})[:2],
                    "health": client.call("GET", "/health")[:2]}
        client.close()
        s.publish("v1", testing.classifier(seed=1))
        s.wait_for_version("v1")
        yield s
    finally:
        host.stop()
        if request.session.testsfailed:
            print(f"--- {provider} server log ---\n{host.log()[-3000:]}")


@pytest.fixture
def client(served):
    c = Client(served.host.url)
    yield c
    c.close()


def probabilities(doc) -> np.ndarray:
    return np.array([list(p["probabilities"].values()) for p in doc["predictions"]], dtype=np.float32)


def test_503_before_any_model(served):
    status, doc = served.before["predict"]
    assert status == 503
    assert "no model is loaded yet" in doc["error"] and "serving/current.json" in doc["error"]
    assert doc["detail"]["code"] == "no_model"
    status, doc = served.before["health"]
    assert status == 503 and doc["status"] == "no_model" and doc["pointer_found"] is False


def test_served_by_a_production_server(served, client):
    _, _, response = client.call("GET", "/health")
    assert response.getheader("server") in ("uvicorn", "gunicorn")
    assert response.getheader("content-type").startswith("application/json")


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_request_is_named(served, client, case):
    _, body, status, code, words = case
    got, doc, _ = client.call("POST", "/predict", body)
    assert got == status, doc
    assert doc["detail"]["code"] == code
    for word in words:
        assert word in doc["error"], (word, doc["error"])
    assert client.call("POST", "/predict", {"instances": [[1, 2, 3, 4]]})[0] == 200  # connection still in sync


@pytest.mark.parametrize("content_type, status", [
    ("text/plain", 415), ("application/x-www-form-urlencoded", 415), ("multipart/form-data; boundary=x", 415),
    ("application/json; charset=utf-8", 200), ("application/vnd.skyfuse+json", 200), (None, 200)])
def test_only_json_bodies_are_taken(served, content_type, status):
    conn = http.client.HTTPConnection("127.0.0.1", urlsplit(served.host.url).port, timeout=10)
    headers = {"Content-Type": content_type} if content_type else {}
    conn.request("POST", urlsplit(served.host.url).path + "/predict", body=b'{"instances": [[1, 2, 3, 4]]}',
                 headers=headers)
    response = conn.getresponse()
    doc = orjson.loads(response.read())
    conn.close()
    assert response.status == status, doc
    if status == 415:
        assert doc["detail"]["code"] == "unsupported_media_type" and "application/json" in doc["error"]


def test_a_chunked_body_over_the_limit_is_refused_while_reading(served):
    """No Content-Length to refuse on: the host counts while reading and stops at the limit."""
    conn = http.client.HTTPConnection("127.0.0.1", urlsplit(served.host.url).port, timeout=30)
    chunk = b"[" + b"1.0," * 16383 + b"1.0]"  # 64 KiB a chunk, 2 MiB in all: twice the limit
    conn.request("POST", urlsplit(served.host.url).path + "/predict", body=iter([chunk] * 32),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = conn.getresponse()
    doc = orjson.loads(response.read())
    conn.close()
    assert response.status == 413 and doc["detail"]["code"] == "body_too_large", doc


def test_unknown_route_and_wrong_method(served, client):
    status, doc, _ = client.call("GET", "/nowhere")
    assert status == 404 and doc["detail"]["code"] == "not_found"
    status, _, _ = client.call("GET", "/predict")
    assert status in (404, 405)  # the Lambda Function URL router answers 404 for a method it has no route for


def test_predictions_equal_onnxruntime(served, client):
    version = served.current()
    status, doc, _ = client.call("POST", "/predict", {"instances": ROWS})
    assert status == 200 and doc["model_version"] == version
    expected = testing.reference(served.models[version], ROWS)
    np.testing.assert_allclose(probabilities(doc), expected, rtol=1e-6, atol=1e-7)
    assert [p["class"] for p in doc["predictions"]] == [testing.IRIS_CLASSES[i] for i in expected.argmax(1)]
    status, compact, _ = client.call("POST", "/predict", {"instances": ROWS, "format": "compact"})
    assert status == 200
    np.testing.assert_allclose(np.array(compact["probabilities"], np.float32), expected, rtol=1e-6, atol=1e-7)


def test_metadata_health_openapi(served, client):
    version = served.current()
    status, meta, _ = client.call("GET", "/metadata")
    assert status == 200 and meta["model_version"] == version
    assert meta["input"]["features"] == list(testing.IRIS_FEATURES) and meta["input"]["width"] == 4
    assert meta["output"]["classes"] == list(testing.IRIS_CLASSES)
    assert meta["sha256"] == sha256_of(served.models[version])
    status, health, _ = client.call("GET", "/health")
    assert status == 200 and health["status"] == "ok"
    status, doc, _ = client.call("GET", "/openapi.json")
    assert status == 200 and doc["openapi"] == "3.1.0" and "/predict" in doc["paths"]


def test_swap_under_steady_load(served):
    """Clients hammer POST /predict while the pointer flips between two models: every answer is 200
    and wholly from the version it names; afterwards the last version is served."""
    a, b = testing.classifier(seed=21), testing.classifier(seed=22, hidden=(16,))
    reference = {id(a): testing.reference(a, ROWS), id(b): testing.reference(b, ROWS)}
    reference.update({id(m): testing.reference(m, ROWS) for m in served.models.values()})
    stop = threading.Event()
    answers: list[tuple] = []
    seen: set[str] = set()  # versions that answered

    def hammer(seed: int):
        c, i = Client(served.host.url), seed
        try:
            while not stop.is_set():
                status, doc, _ = c.call("POST", "/predict", {"instances": ROWS[i % 8: i % 8 + 1]})
                answers.append((status, doc.get("model_version"), i % 8,
                                probabilities(doc)[0] if status == 200 else doc))
                seen.add(doc.get("model_version"))
                i += 1
        finally:
            c.close()

    clients = [threading.Thread(target=hammer, args=(k,)) for k in range(3)]
    for t in clients:
        t.start()
    flips = [(f"swap-{k}", a if k % 2 == 0 else b) for k in range(8)]
    def answered(version: str) -> None:  # wait until the clients have been served by `version`
        deadline = time.monotonic() + 15
        while version not in seen:
            assert time.monotonic() < deadline, f"no answer from {version} within 15 s"
            time.sleep(0.01)

    try:
        answered(served.current())
        for version, data in flips:
            served.publish(version, data)
            answered(version)
    finally:
        stop.set()
        for t in clients:
            t.join()
    failed = [x for x in answers if x[0] != 200]
    assert not failed, failed[:5]
    assert len(answers) > 100
    versions = {x[1] for x in answers}
    assert {v for v, _ in flips} <= versions  # the load really spanned every swap
    for _status, version, row, probs in answers:
        np.testing.assert_allclose(probs, reference[id(served.models[version])][row], rtol=1e-5, atol=1e-6,
                                   err_msg=f"answer named {version} but came from another model")
    served.wait_for_version(flips[-1][0])
    c = Client(served.host.url)
    status, doc, _ = c.call("POST", "/predict", {"instances": ROWS})
    c.close()
    assert status == 200 and doc["model_version"] == flips[-1][0]
    np.testing.assert_allclose(probabilities(doc), reference[id(flips[-1][1])], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["bytes-changed", "sha256-mismatch", "not-onnx", "missing-object"])
def test_corrupted_model_is_never_served(served, client, kind):
    good = f"good-before-{kind}"
    served.publish(good, testing.classifier(seed=31))
    served.wait_for_version(good)
    bad = f"bad-{kind}"
    if kind == "bytes-changed":  # the object changed after its digest was taken
        info = served.store.put(model_key(bad), testing.classifier(seed=32))
        data = bytearray(served.store.read(model_key(bad)))
        data[len(data) // 2] ^= 0x55
        served.store.put(model_key(bad), bytes(data))
        served.store.put(POINTER_KEY, Pointer(bad, info.uri, info.sha256).to_json())
    elif kind == "sha256-mismatch":
        info = served.store.put(model_key(bad), testing.classifier(seed=32))
        served.store.put(POINTER_KEY, Pointer(bad, info.uri, "0" * 64).to_json())
    elif kind == "not-onnx":
        info = served.store.put(model_key(bad), b"PK\x03\x04 this is a zip, not an ONNX model" * 20)
        served.store.put(POINTER_KEY, Pointer(bad, info.uri, info.sha256).to_json())
    else:
        served.store.put(POINTER_KEY, Pointer(bad, model_key("never-written"), "1" * 64).to_json())
    health = served.wait_for(lambda d: (d["last_error"] or {}).get("version") == bad, f"the {bad} error")
    assert health["status"] == "ok" and health["model_version"] == good
    words = {"bytes-changed": "sha256", "sha256-mismatch": "sha256", "not-onnx": "not a loadable ONNX model",
             "missing-object": "cannot be read"}[kind]
    assert health["last_error"]["error"] == "see GET /metadata"  # /health is open: no error text there
    assert words in client.call("GET", "/metadata")[1]["last_error"]["error"]
    for _ in range(20):  # ... and is still the only model answering, through retries of the bad one
        status, doc, _ = client.call("POST", "/predict", {"instances": ROWS[:2]})
        assert status == 200 and doc["model_version"] == good
        time.sleep(0.02)
    assert client.call("GET", "/metadata")[1]["model_version"] == good
    served.publish(f"good-after-{kind}", testing.classifier(seed=33))  # a good model clears the error
    health = served.wait_for_version(f"good-after-{kind}")
    assert health["last_error"] is None


def test_metrics_sampled_events_on_the_bus(served, client):
    for _ in range(20):
        assert client.call("POST", "/predict", {"instances": ROWS[:1]})[0] == 200
    bus = open_bus(config.load(environ={"SKYFUSE_BUS__EMBEDDED__PATH": served.bus_path}))
    try:
        deadline = time.monotonic() + 10
        while True:
            docs = [orjson.loads(r.value) for r in bus.read("skyfuse.metrics.sampled", limit=10_000)]
            busy = [d for d in docs if d["requests"] > 0]
            if busy or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        bus.close()
    assert busy, docs[-3:]
    for doc in docs:
        contracts.validate("metrics.sampled", doc)
        assert doc["cloud"] == served.provider and doc["source"] == "inference"
    assert busy[-1]["latency_ms"]["p50"] > 0 and busy[-1]["model_version"]


def test_stop_ends_the_server(served):
    client = Client(served.host.url)
    assert client.call("GET", "/health")[0] == 200  # a keep-alive connection is open while it stops
    started = time.monotonic()
    served.host.stop(timeout_s=5)
    assert time.monotonic() - started < 8
    assert not served.host.alive()
    with pytest.raises(OSError):
        Client(served.host.url).call("GET", "/health")
    client.close()


@pytest.fixture(scope="module", params=hosts.PROVIDERS)
def guarded(request, tmp_path_factory):
    """A host with API keys configured (as digests)."""
    from skyfuse.serving.api import key_hash
    from skyfuse.serving.model import publish

    provider = request.param
    root = tmp_path_factory.mktemp(f"guarded-{provider}")
    store_uri, env = host_env(provider, root, INFERENCE_METRICS_S="0",
                              INFERENCE_API_KEY_HASHES=f"{key_hash('old-key-123')},{key_hash('new-key-456')}")

    publish(open_store(store_uri), "v1", testing.classifier(seed=1))
    host = hosts.start(provider, env=env, log_dir=root)
    try:
        yield host
    finally:
        host.stop()


@pytest.mark.parametrize("headers, status", [
    ({}, 401), ({"X-API-Key": "wrong"}, 401), ({"Authorization": "Bearer wrong"}, 401),
    ({"Authorization": "Basic old-key-123"}, 401), ({"X-API-Key": "old-key-123"}, 200),
    ({"Authorization": "Bearer new-key-456"}, 200), ({"x-api-key": "new-key-456"}, 200)])
def test_api_keys_guard_predict_and_metadata_but_not_health(guarded, headers, status):
    port, base = urlsplit(guarded.url).port, urlsplit(guarded.url).path
    answers = {}
    for method, path, body in (("POST", "/predict", b'{"instances": [[1, 2, 3, 4]]}'), ("GET", "/metadata", None),
                               ("GET", "/health", None)):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(method, base + path, body=body, headers={"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        answers[path] = (response.status, orjson.loads(response.read()))
        conn.close()
    assert answers["/predict"][0] == answers["/metadata"][0] == status, answers
    assert answers["/health"][0] == 200
    if status == 401:
        assert answers["/predict"][1]["detail"]["code"] == "unauthorized"
        assert "X-API-Key" in answers["/predict"][1]["error"]


def running(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("provider", hosts.PROVIDERS)
def test_a_server_stops_when_the_process_that_started_it_is_killed(provider, tmp_path):
    """A `skyfuse up` killed by SIGKILL runs no `stop`: its servers must not live on, holding their ports."""
    _, env = host_env(provider, tmp_path)
    code = ("import json, sys; from skyfuse.dev import hosts; "
            "host = hosts.start(sys.argv[1], env=json.loads(sys.argv[2]), log_dir=sys.argv[3]); "
            "print(host.port, host.pid, flush=True); sys.stdin.read()")
    starter = subprocess.Popen([sys.executable, "-c", code, provider, orjson.dumps(env).decode(), str(tmp_path)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port, pid = map(int, starter.stdout.readline().split())
        assert hosts.listened_on(port) and running(pid)
    finally:
        starter.kill()
        starter.wait(60)
    deadline = time.monotonic() + 60
    while hosts.listened_on(port) or running(pid):
        assert time.monotonic() < deadline, f"the {provider} server outlived its starter by 60 s"
        time.sleep(0.05)
