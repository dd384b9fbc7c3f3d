"""One front door for the local fleet: forwards inference requests to the placed clouds by their
current placement weights, and follows `placement.changed` without a restart.

A request goes to a cloud drawn by weight; when that cloud refuses the connection or answers 5xx,
the other placed clouds are tried, heaviest first, so a caller sees no error while any placed cloud
is up. Before any placement every cloud with an endpoint counts equally. GET /router shows the
placement followed and what each cloud answered. In the real clouds weighted DNS plays this part.
"""
from __future__ import annotations

import json
import logging
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from skyfuse import contracts, events, httpclient, signing
from skyfuse.bus import Bus
from skyfuse.config import Fleet
from skyfuse.payloads import PlacementChanged

log = logging.getLogger("skyfuse.router")
FORWARDED = ("content-type", "x-api-key", "authorization", "content-length")


class Placement:
    """The newest verified placement decision on the bus (highest `sequence`)."""

    def __init__(self, fleet: Fleet, bus: Bus) -> None:
        self.fleet, self.bus = fleet, bus
        self.sequence = -1
        self.weights: dict[str, float] = {}
        self.version: str | None = None
        self.topic = contracts.event_type("placement.changed").topic

    def refresh(self) -> None:
        if self.topic not in self.bus.topics():
            return
        for record in self.bus.tail(self.topic, 20):
            try:
                event = events.decode(record.key, record.value, record.headers)
                signing.check(self.fleet, event)  # a forged decision moves no traffic
            except (events.MalformedEvent, signing.Untrusted):
                continue
            data = cast(PlacementChanged, event.get_data())  # decode validated it against its schema
            if data.get("sequence", 0) > self.sequence:
                self.sequence, self.version = data.get("sequence", 0), data["model_version"]
                self.weights = {p["cloud"]: p["weight"] for p in data["placements"] if p["weight"] > 0}


class Router:
    def __init__(self, endpoints: dict[str, str], placement: Placement, seed: int | None = None) -> None:
        self.endpoints, self.placement = endpoints, placement
        self.random = random.Random(seed)
        self.counts: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    def order(self) -> list[str]:
        """The clouds to try for one request: one drawn by weight, then the rest of the placed ones."""
        weights = {c: w for c, w in self.placement.weights.items() if c in self.endpoints} or \
            {c: 1.0 for c in self.endpoints}
        clouds = sorted(weights, key=lambda c: -weights[c])
        first = self.random.choices(clouds, [weights[c] for c in clouds])[0]
        return [first, *(c for c in clouds if c != first)]

    def forward(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, str, str]:
        """(status, body, content type, cloud that answered). When every placed cloud answers 5xx,
        the last of those answers (its own error says what is wrong); when none answers, a 503."""
        tried: list[str] = []
        last: tuple[int, bytes, str, str] | None = None
        for cloud in self.order():
            try:
                status, answer, kind = _call(self.endpoints[cloud], method, path, body, headers)
            except httpclient.HttpError as exc:
                tried.append(f"{cloud}: {type(exc.__cause__ or exc).__name__}")
                self._count(cloud, "refused")
                continue
            if status >= 500:
                tried.append(f"{cloud}: HTTP {status}")
                self._count(cloud, "5xx")
                last = status, answer, kind, cloud
                continue
            self._count(cloud, "answered")
            return status, answer, kind, cloud
        if last:
            return last
        error = {"error": f"no placed cloud answered ({'; '.join(tried)}): is `skyfuse up` serving?",
                 "detail": {"code": "no_cloud", "tried": tried}}
        return 503, json.dumps(error).encode(), "application/json", ""

    def _count(self, cloud: str, outcome: str) -> None:
        with self._lock:
            per = self.counts.setdefault(cloud, {})
            per[outcome] = per.get(outcome, 0) + 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counts = {c: dict(v) for c, v in self.counts.items()}
        return {"placement": {"sequence": self.placement.sequence, "model_version": self.placement.version,
                              "weights": self.placement.weights}, "endpoints": self.endpoints, "counts": counts}


def _call(base: str, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, str]:
    answer = httpclient.request(method, base + path, body or None, headers=headers, timeout_s=30)
    return answer.status, answer.body, answer.content_type


class RouterServer:
    """The router on 127.0.0.1:`port`, refreshing the placement every `poll_s`, in threads."""

    def __init__(self, router: Router, port: int, poll_s: float = 0.5) -> None:
        self.router, self.poll_s = router, poll_s
        try:
            self.http = ThreadingHTTPServer(("127.0.0.1", port), _handler(router))
        except OSError as exc:
            raise OSError(f"the router cannot listen on 127.0.0.1:{port} ({exc.strerror}): choose another port "
                          "with --router-port, or 0 for none") from None
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self.http.serve_forever, name="skyfuse-router", daemon=True),
                        threading.Thread(target=self._follow, name="skyfuse-router-placement", daemon=True)]

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self.router.placement.refresh()
            except Exception:  # the bus hiccuped: keep routing by what is known
                log.exception("placement refresh failed")
            self._stop.wait(self.poll_s)

    def start(self) -> RouterServer:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.http.shutdown()
        self.http.server_close()


def _handler(router: Router) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status: int, body: bytes, kind: str, cloud: str = "") -> None:
            self.send_response(status)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            if cloud:
                self.send_header("x-skyfuse-cloud", cloud)
            self.end_headers()
            self.wfile.write(body)

        def _route(self, method: str) -> None:
            if self.path == "/router":
                return self._answer(200, json.dumps(router.stats()).encode(), "application/json")
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            headers = {k: v for k, v in self.headers.items() if k.lower() in FORWARDED}
            self._answer(*router.forward(method, self.path, body, headers))

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def log_message(self, format: str, *args: Any) -> None:  # the servers behind log their requests
            pass

    return Handler
