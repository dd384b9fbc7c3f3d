"""The inference service's own routes, in one table: every entry point registers them from it, the
handler answers and counts them by it, and the OpenAPI document lists them from it.

The Open Inference Protocol v2 routes have their own table, `skyfuse.serving.oip.ROUTES`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    name: str  # the view in `services.inference.handler.VIEWS`, the OpenAPI operationId, the Azure function
    auth: bool  # takes the API keys (INFERENCE_API_KEY_HASHES); the others stay open
    summary: str  # the OpenAPI summary


ROUTES = (
    Route("POST", "/predict", "predict", True, "Classify rows"),
    Route("GET", "/health", "health", False, "Serving status"),
    Route("GET", "/metadata", "metadata", True, "The served model: version, lineage, input schema"),
    Route("GET", "/openapi.json", "openapi", False, "This document"),
    Route("GET", "/metrics", "metrics", False, "Prometheus metrics of this host (open, like /health)"),
)
BY_PATH = {route.path: route for route in ROUTES}
