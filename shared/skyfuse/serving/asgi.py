"""The few ASGI pieces the local hosts share (no framework, no cloud SDK)."""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from skyfuse.serving.prometheus import Tracker

JSON_HEADERS = [(b"content-type", b"application/json")]

Scope = MutableMapping[str, Any]  # an ASGI connection scope
Message = MutableMapping[str, Any]  # an ASGI event, received or sent
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def header_lookup(scope: Scope) -> Callable[[str], str | None]:
    """`header(name)`: a request header by name (any case), the first of repeated ones, or None."""
    raw = scope.get("headers", ())

    def header(name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        for key, value in raw:  # ASGI servers hand the names over in lower case
            if key == wanted:
                found: str = value.decode("latin-1")
                return found
        return None

    return header


async def read_body(receive: Receive, limit: int, tracked: Tracker | None = None) -> bytes | None:
    """The request body, or None as soon as it grows past `limit` bytes; the bytes read are added to
    `tracked.received`."""
    message = await receive()
    body = message.get("body", b"")
    size = len(body)
    if tracked is not None:
        tracked.received += size
    if not message.get("more_body", False):
        return body if size <= limit else None
    chunks = [body]
    while message.get("more_body", False):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if tracked is not None:
            tracked.received += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def replay(body: bytes) -> Receive:
    """A `receive` that hands an inner app the body already read."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def noting_status(send: Send, tracked: Tracker) -> Send:
    """`send`, noting the response's status on `tracked` (a `prometheus.Tracker`) as it starts, and
    the body bytes it sends; the request is finished (counted) as its last chunk goes."""
    async def noted(message: Message) -> None:
        if message["type"] == "http.response.start":
            tracked.status = message["status"]
        elif message["type"] == "http.response.body":
            tracked.sent += len(message.get("body", b""))
            if not message.get("more_body", False):
                tracked.finish()  # counted before the client can see its answer
        await send(message)

    return noted


def response_headers(headers: Mapping[str, str] | None) -> list[tuple[bytes, bytes]]:
    """A reply's headers as ASGI's list, JSON unless they name another content type."""
    if not headers:
        return JSON_HEADERS
    out = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    return out if any(name == b"content-type" for name, _ in out) else [*out, *JSON_HEADERS]


async def send_response(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None,
                        tracked: Tracker | None = None) -> None:
    """One whole response; `tracked` (a `prometheus.Tracker`) gets its status and size, and is
    finished before the body leaves, as `noting_status` does."""
    await send({"type": "http.response.start", "status": status, "headers": headers or JSON_HEADERS})
    if tracked is not None:
        tracked.status = status
        tracked.sent += len(body)
        tracked.finish()
    await send({"type": "http.response.body", "body": body})


async def lifespan(receive: Receive, send: Send, startup: Callable[[], object] | None = None) -> None:
    """Answer the lifespan protocol; `startup()` runs before the server takes requests (a failure
    stops the server with the message)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                if startup:
                    startup()
            except Exception as exc:  # noqa: BLE001 - reported to the server, which exits
                await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
