"""Object stores behind one interface: each cloud keeps its shards and models in its own store.

`open_store(uri)` picks the backend by scheme; `fetch(uri, sha256)` reads any object by its full
URI (how a model crosses from one cloud's store to another's) and checks its digest.
"""
from __future__ import annotations

from skyfuse.storage.base import IntegrityError, NotFound, ObjectInfo, Store, StoreError, sha256_of
from skyfuse.storage.file import FileStore

__all__ = ["IntegrityError", "NotFound", "ObjectInfo", "Store", "StoreError", "open_store", "fetch", "sha256_of"]


def open_store(uri: str) -> Store:
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme == "file":
        return FileStore(uri)
    raise StoreError(f"no store backend for {uri!r}; supported here: file://PATH")


def split_uri(uri: str) -> tuple[str, str]:
    """`file:///x/stores/aws/runs/r1/a.csv` → (store URI, key) for the store that holds it."""
    if uri.startswith("file://"):
        return FileStore.split(uri)
    raise StoreError(f"no store backend for {uri!r}; supported here: file://PATH")


def fetch(uri: str, sha256: str | None = None) -> bytes:
    """The bytes of the object at `uri`, verified against `sha256` when given."""
    root, key = split_uri(uri)
    return open_store(root).get(key, sha256)
