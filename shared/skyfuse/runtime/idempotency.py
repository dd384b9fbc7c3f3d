"""One effect per event: the idempotency layer every function with side effects goes through.

    with runtime.once(f"export/{run}/{round}/{cloud}-{shard}") as claim:
        if claim.done:                       # a duplicate: the work was done and announced
            return
        ...write outputs, emit events...     # the effects
        claim.result = {"onnx_uri": ...}     # kept with the completed record

The same semantics as Powertools' idempotency utility, with the function's own cloud store as the
persistence layer (no extra database in any cloud):

- On entry an *in-progress* record is created at `idempotency/<function>/<key>.json` with
  create-if-absent (O_EXCL + link on a folder, `IfNoneMatch`/`ifGenerationMatch=0`/`If-None-Match`
  on the clouds), so two instances never both start the same work.
- An in-progress record another instance holds makes the call raise `InProgress`, which the host
  retries with backoff; one older than `expires_after_s` (its holder crashed) is taken over.
- When the work raises, the record is deleted, so nothing blocks the retry.
- Only after the work returned (its outputs written, its events published) is the record replaced
  by a *completed* one, with the result. From then on the key is a no-op that returns the result.

A crash between publishing and completing leaves an in-progress record that expires; the retry
then does the work again and publishes events with the same deterministic ids
(`Runtime.emit(..., dedupe_key=...)`), so consumers see a redelivery, never a second effect.
"""
from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson

from skyfuse.storage.base import NotFound, Store

DEFAULT_EXPIRY_S = 120.0  # config: delivery.claim_timeout_s
_SAFE = re.compile(r"[^A-Za-z0-9._=-]+")


class InProgress(RuntimeError):
    """Another instance holds the key and its record has not expired: retry later."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Claim:
    key: str
    done: bool = False  # True: completed before; `result` is what it recorded
    result: dict[str, Any] = field(default_factory=dict)


class Idempotency:
    def __init__(self, store: Store, function: str, owner: str, expires_after_s: float = DEFAULT_EXPIRY_S,
                 clock: Callable[[], float] = time.time):
        self.store, self.function, self.owner = store, function, owner
        self.expires_after_s, self.clock = expires_after_s, clock

    def record_key(self, key: str) -> str:
        """Readable and bounded: the key's safe characters, then a digest of the whole key."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return f"idempotency/{self.function}/{_SAFE.sub('_', key)[:120]}-{digest}.json"

    def status(self, key: str) -> dict[str, Any] | None:
        """The record of `key` as stored, or None."""
        try:
            record: dict[str, Any] = orjson.loads(self.store.read(self.record_key(key)))  # an object, as written
            return record
        except NotFound:
            return None
        except orjson.JSONDecodeError:
            return {"status": "unreadable"}

    @contextmanager
    def once(self, key: str) -> Iterator[Claim]:
        claim = self._enter(key)
        if claim.done:
            yield claim
            return
        try:
            yield claim
        except BaseException:
            self._release(key)
            raise
        self.store.put(self.record_key(key), orjson.dumps({
            "status": "completed", "key": key, "by": self.owner, "completed_at": self.clock(),
            "result": claim.result}))

    def _enter(self, key: str) -> Claim:
        name = self.record_key(key)
        for _ in range(2):
            now = self.clock()
            record = {"status": "in_progress", "key": key, "by": self.owner, "started_at": now,
                      "expires_at": now + self.expires_after_s}
            if self.store.create(name, orjson.dumps(record)):
                return Claim(key)
            held = self.status(key)
            if held is None:
                continue  # released between our create and read: try again
            if held.get("status") == "completed":
                return Claim(key, done=True, result=held.get("result") or {})
            expires_at = held.get("expires_at")
            if isinstance(expires_at, (int, float)) and expires_at > now:
                raise InProgress(f"{key} is being handled by {held.get('by', '?')}; its claim expires in "
                                 f"{expires_at - now:.0f} s", retry_after_s=max(0.1, expires_at - now))
            self._release(key)  # expired (its holder died) or unreadable: take it over
        raise InProgress(f"{key}: another instance took the expired claim at the same time; retry")

    def _release(self, key: str) -> None:
        try:
            self.store.delete(self.record_key(key))
        except Exception:  # noqa: BLE001 - the record expires anyway; the original error matters more
            pass
