"""HTTP calls of the command line and the local fleet (health checks, predictions, load): a
request with a timeout, an `Answer` whose `json()` parses the body, and an `HttpError` naming the
method and URL when the server cannot be reached or does not answer JSON.

    answer = httpclient.request("GET", "http://127.0.0.1:8101/health", timeout_s=3)
    answer.status, answer.json()

`Connection` keeps one HTTP/1.1 connection open across requests (a load generator's caller).
Standard library only; servers use their own frameworks, not this.
"""
from __future__ import annotations

import http.client
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from skyfuse.errors import Failure

JSON_HEADERS = {"content-type": "application/json"}


class HttpError(Failure):
    """The server could not be reached, timed out, or answered something that is not JSON."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    url: str = ""
    content_type: str = "application/json"  # what the server said, or JSON when it said nothing

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise HttpError(f"{self.url} answered {self.status} with a body that is not JSON ({exc}): "
                            f"{self.body[:200]!r}") from None


class Connection:
    """One keep-alive connection to the server at `base_url`; a request after a failure reconnects."""

    def __init__(self, base_url: str, timeout_s: float = 10.0):
        parts = urlsplit(base_url)
        host = parts.hostname
        if parts.scheme not in ("http", "https") or not host:
            raise HttpError(f"not an http(s) URL: {base_url!r}")
        self.base_url, self.prefix = base_url.rstrip("/"), parts.path.rstrip("/")
        self.query = f"?{parts.query}" if parts.query else ""  # of base_url itself, for a request of path ""
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._connect: Callable[[], http.client.HTTPConnection] = lambda: kind(host, parts.port, timeout=timeout_s)
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str = "", body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Answer:
        """`method` on base_url + `path`; HttpError when it cannot be sent or answered."""
        url = self.base_url + path
        try:
            self._conn = self._conn or self._connect()
            target = self.prefix + path + ("" if path else self.query)
            self._conn.request(method, target or "/", body, headers or {})
            response = self._conn.getresponse()
            return Answer(response.status, response.read(), url,
                          response.getheader("content-type", "application/json"))
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise HttpError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(method: str, url: str, body: bytes | None = None, *, headers: dict[str, str] | None = None,
            timeout_s: float = 5.0) -> Answer:
    """One request on a connection of its own."""
    with Connection(url, timeout_s) as conn:
        return conn.request(method, "", body, headers)


def get_json(url: str, timeout_s: float = 5.0) -> Any:
    """The JSON body of GET `url`, whatever the status (a 503 health answer is JSON too)."""
    return request("GET", url, timeout_s=timeout_s).json()


def post_json(url: str, doc: Any, *, headers: dict[str, str] | None = None, timeout_s: float = 10.0) -> Answer:
    """POST `doc` (bytes as they are, anything else as JSON) with a JSON content type."""
    body = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return request("POST", url, body, headers={**JSON_HEADERS, **(headers or {})}, timeout_s=timeout_s)
