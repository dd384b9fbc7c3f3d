"""The store contract: keys are `/`-separated paths inside one bucket, container or folder."""
from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass

from skyfuse.errors import Failure


class StoreError(Failure):
    """Its message is redacted when made: store errors travel into logs, events and HTTP answers."""

    def __init__(self, message: object = ""):
        from skyfuse.redact import redact

        super().__init__(redact(str(message)))


class NotFound(StoreError):
    pass


class IntegrityError(StoreError):
    """The bytes read do not have the digest the event announced."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    sha256: str
    size: int


class Store(abc.ABC):
    uri: str  # the store's own URI, e.g. file:///abs/path or s3://bucket

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> ObjectInfo:
        """Write `data` at `key` atomically (a reader sees the old object or the new, never half)."""

    @abc.abstractmethod
    def read(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write `data` only if `key` does not exist; True when this call created it. Atomic: a
        reader, or a crash, never leaves a partial object at `key`."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object at `key`, if there is one."""

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix`, sorted."""

    def uri_for(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    def get(self, key: str, sha256: str | None = None) -> bytes:
        data = self.read(key)
        if sha256 is not None and sha256_of(data) != sha256:
            raise IntegrityError(f"{self.uri_for(key)} has sha256 {sha256_of(data)}, expected {sha256}: "
                                 "the object changed or was corrupted after it was announced")
        return data
