"""The few ASGI pieces the local hosts share (no framework, no cloud SDK)."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from skyfuse.serving.prometheus import Tracker

JSON_HEADERS = [(b"content-type", b"application/json")]

Scope = dict[str, Any]  # an ASGI connection scope
Message = dict[str, Any]  # an ASGI event, received or sent
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


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None as soon as it grows past `limit` bytes."""
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body if len(body) <= limit else None
    chunks, size = [body], len(body)
    while message.get("more_body", False):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
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


def counting(receive: Receive, tracked: Tracker) -> Receive:
    """`receive`, adding the request body bytes it hands over to `tracked.received`."""
    async def counted() -> Message:
        message = await receive()
        tracked.received += len(message.get("body", b""))
        return message

    return counted


async def send_response(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers or JSON_HEADERS})
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
