"""One table of the inference service's own routes (`skyfuse.serving.routes`): every entry point
serves exactly it, the handler answers, counts and lists by it, and the OpenAPI document is made
from it (the v2 routes from `oip.ROUTES`)."""
import json
import sys
from pathlib import Path

import functions_framework
import orjson
import pytest
from starlette.testclient import TestClient

from services.inference import handler
from skyfuse.serving import api, oip, routes, testing
from tests.unit.conftest import inference_core

REPO = Path(__file__).resolve().parents[2]
KEY = "route-table-key"
PROVIDERS = ("aws", "gcp", "azure")


@pytest.fixture(scope="module")
def model_bytes():
    return testing.classifier(seed=5)


@pytest.fixture
def served(tmp_path, monkeypatch, model_bytes):
    """This process's inference core with API keys on, serving v1."""
    monkeypatch.setenv("INFERENCE_METRICS_S", "0")
    monkeypatch.setenv("INFERENCE_API_KEY_HASHES", api.key_hash(KEY))
    with inference_core(tmp_path, model_bytes) as service:
        yield service


def client(provider: str) -> tuple[TestClient, str]:
    """(a client of the entry point as its local host serves it, the route prefix)."""
    if provider == "aws":
        from services.inference import aws

        return TestClient(aws.asgi), ""
    if provider == "azure":
        from services.inference.azure_host import create_app

        return TestClient(create_app()), "/api"
    saved = list(sys.path)  # create_app appends services/inference, whose azure.py would shadow `azure`
    try:
        app = functions_framework.create_app(target="inference", source=str(REPO / "services/inference/gcp.py"),
                                             signature_type="http")
    finally:
        sys.path[:] = saved
    return TestClient(app), ""


def call(c: TestClient, method: str, path: str, key: str | None = None):
    headers = {"Content-Type": "application/json", **({"X-API-Key": key} if key else {})}
    body = json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]}) if method == "POST" else None
    return c.request(method, path, content=body, headers=headers)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_entry_point_serves_the_table_with_its_auth(served, provider):
    c, prefix = client(provider)
    for route in routes.ROUTES:
        answered = call(c, route.method, prefix + route.path, KEY)
        assert answered.status_code == 200, (route, answered.text)
        unkeyed = call(c, route.method, prefix + route.path)
        assert unkeyed.status_code == (401 if route.auth else 200), route
        if route.auth:
            assert unkeyed.json()["detail"]["code"] == "unauthorized"
        other = "GET" if route.method == "POST" else "POST"
        wrong = call(c, other, prefix + route.path, KEY)
        assert wrong.status_code in (404, 405), route  # Powertools has no 405: its not-found answers
        assert wrong.json()["detail"]["code"] in ("not_found", "method_not_allowed")


def test_the_azure_functions_are_the_table_and_the_v2_routes(served):
    from services.inference import azure
    from services.inference.azure_host import http_routes

    served_routes = {path: sorted(methods) for path, methods in http_routes(azure.app).items()}
    expected = {f"/api{route.path}": [route.method] for route in routes.ROUTES}
    expected.update({f"/api{template}": [method] for method, template, _ in oip.ROUTES})
    assert served_routes == expected


def test_the_openapi_document_is_made_from_the_tables():
    doc = orjson.loads(api.openapi()[1])
    own = {(route.path, route.method.lower()) for route in routes.ROUTES}
    v2 = {(template, method.lower()) for method, template, _ in oip.ROUTES}
    assert {(path, method) for path, ops in doc["paths"].items() for method in ops} == own | v2
    for route in routes.ROUTES:
        operation = doc["paths"][route.path][route.method.lower()]
        assert (operation["operationId"], operation["summary"]) == (route.name, route.summary)
        assert ("401" in operation["responses"]) == route.auth, route


def test_a_route_without_its_openapi_bodies_is_refused(monkeypatch):
    extra = routes.Route("GET", "/extra", "extra", False, "Not described")
    monkeypatch.setattr(routes, "ROUTES", routes.ROUTES + (extra,))
    with pytest.raises(RuntimeError, match="differ"):
        api._paths(api.DEFAULT_LIMITS)


def test_the_handler_lists_and_counts_the_table(served):
    assert set(handler.VIEWS) == {route.name for route in routes.ROUTES}
    status, body = handler.not_found("GET", "/nowhere")
    message = orjson.loads(body)["error"]
    assert status == 404
    assert all(f"{route.method} {route.path}" in message for route in routes.ROUTES)
    assert [handler.route_of(route.path) for route in routes.ROUTES] == [route.path for route in routes.ROUTES]
    assert [handler.route_of(f"/API{route.path.upper()}", "/api") for route in routes.ROUTES] == [
        route.path for route in routes.ROUTES]
