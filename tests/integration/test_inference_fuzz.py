"""schemathesis against each cloud's inference host, driven by the host's own OpenAPI document:
whatever it generates (valid and invalid bodies, methods, content), no answer is a 5xx and every
error is a 4xx JSON error naming its problem: {"error", "detail": {"code"}}, or on the Open
Inference Protocol routes (/v2/...) that protocol's {"error"}. The one exception is functions-
framework's own: it keeps a path with a newline from the gcp function and answers its plain 404."""
import http.client
import itertools
from urllib.parse import unquote, urlsplit

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from skyfuse.dev import hosts
from skyfuse.serving import testing
from skyfuse.serving.model import publish
from skyfuse.storage import open_store
from tests.integration.test_inference_hosts import host_env


@pytest.fixture(scope="module", params=hosts.PROVIDERS)
def host(request, tmp_path_factory):
    provider = request.param
    root = tmp_path_factory.mktemp(f"fuzz-{provider}")
    store_uri, env = host_env(provider, root, INFERENCE_METRICS_S="0")
    publish(open_store(store_uri), "v1", testing.classifier(seed=1))
    server = hosts.start(provider, env=env, log_dir=root)
    try:
        yield provider, server
    finally:
        server.stop()


def openapi_document(url: str) -> dict:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", parts.path + "/openapi.json")
    doc = orjson.loads(conn.getresponse().read())
    conn.close()
    return doc


def test_no_input_makes_a_host_fail_or_answer_without_a_json_error(host):
    provider, server = host
    schema = schemathesis.openapi.from_dict(openapi_document(server.url))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/predict", "/health", "/metadata", "/openapi.json", "/metrics", "/v2",
                                              "/v2/health/live", "/v2/health/ready", "/v2/models/{name}",
                                              "/v2/models/{name}/ready", "/v2/models/{name}/infer",
                                              "/v2/models/{name}/versions/{version}/infer"}
    tried, statuses, v2_statuses = 0, {}, {}

    def fuzz(operation, mode):
        @given(case=operation.as_strategy(mode))
        @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def call(case):
            nonlocal tried
            response = case.call(base_url=server.url, timeout=10)
            tried += 1
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if operation.path.endswith("/infer"):
                v2_statuses[response.status_code] = v2_statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (operation.path, response.status_code, response.text[:300])
            if response.status_code >= 400:
                if provider == "gcp" and "\n" in unquote(case.formatted_path) and response.text == "Not Found":
                    assert response.status_code == 404  # functions-framework kept the path from the function
                    return
                doc = response.json()
                assert isinstance(doc.get("error"), str) and doc["error"], doc
                if operation.path.startswith("/v2"):
                    assert set(doc) == {"error"}, doc
                else:
                    assert doc["detail"]["code"], doc

        try:
            call()
        except Unsatisfiable:  # e.g. no invalid request exists for a GET without parameters
            pass

    for operation, mode in itertools.product(operations, GenerationMode):  # valid requests, then invalid ones
        fuzz(operation, mode)
    print(f"{provider}: {tried} requests, statuses {dict(sorted(statuses.items()))}; "
          f"v2 infer {dict(sorted(v2_statuses.items()))}")
    assert tried >= 100 and statuses.get(200) and statuses.get(400)
    assert v2_statuses.get(200) and v2_statuses.get(400) and v2_statuses.get(404)
