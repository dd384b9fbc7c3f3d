"""Object stores behind one interface: each cloud keeps its shards and models in its own store.

`open_store(uri)` picks the backend by scheme; `fetch(uri, sha256)` reads any object by its full
URI (how a model crosses from one cloud's store to another's) and checks its digest.

Store URIs, their backends, and where the endpoint and credentials come from:

- `file://PATH`: a local folder (`FileStore`).
- `s3://BUCKET[/PREFIX]`: Amazon S3 / LocalStack (`S3Store`, boto3); `$AWS_ENDPOINT_URL_S3` or
  `$AWS_ENDPOINT_URL`, boto3's credential chain, `$AWS_REGION` / `$AWS_DEFAULT_REGION`.
- `gs://BUCKET[/PREFIX]`: Google Cloud Storage / its emulator (`GCSStore`, google-cloud-storage);
  `$STORAGE_EMULATOR_HOST` (anonymous), else Application Default Credentials.
- `az://CONTAINER[/PREFIX]`: Azure Blob Storage / Azurite (`AzureStore`, azure-storage-blob);
  `$AZURE_STORAGE_CONNECTION_STRING` (or `$AZURE_STORAGE_ACCOUNT_URL` with a credential).

An object's URI is the store's URI plus its key (`s3://skyfuse-aws/runs/r1/shards/0.csv`); keys are
`/`-separated paths, and `keys` builds every key of a run (`runs/<run>/…`, with the layout). The
cloud SDKs are imported only when a store of theirs is opened. Construct `S3Store`, `GCSStore`,
`AzureStore` directly to pass the endpoint and credentials as arguments.

Errors are `StoreError`s: `NotFound` (no such object), `IntegrityError` (digest mismatch),
`Unreachable` (the endpoint does not answer; for an emulator on this machine the message says to run
`make emulators-up`), and a plain `StoreError` for a missing bucket, refused credentials or any
other failure, each naming the store and the endpoint.
"""
from __future__ import annotations

from typing import Protocol

from skyfuse.storage.base import IntegrityError, NotFound, ObjectInfo, Store, StoreError, sha256_of
from skyfuse.storage.cloud import Unreachable
from skyfuse.storage.file import FileStore

__all__ = ["IntegrityError", "NotFound", "ObjectInfo", "Store", "StoreError", "Unreachable", "open_store",
           "split_uri", "fetch", "sha256_of"]

SUPPORTED = "file://PATH, s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX], az://CONTAINER[/PREFIX]"


class _Backend(Protocol):
    """A store class: made from a store URI, and splits an object URI into (store URI, key)."""

    def __call__(self, uri: str) -> Store: ...

    def split(self, uri: str) -> tuple[str, str]: ...


def _backend(uri: str) -> _Backend:
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme == "file":
        return FileStore
    if scheme == "s3":
        from skyfuse.storage.s3 import S3Store

        return S3Store
    if scheme == "gs":
        from skyfuse.storage.gcs import GCSStore

        return GCSStore
    if scheme == "az":
        from skyfuse.storage.azure import AzureStore

        return AzureStore
    raise StoreError(f"no store backend for {uri!r}; supported: {SUPPORTED}")


def open_store(uri: str) -> Store:
    return _backend(uri)(uri)


def split_uri(uri: str) -> tuple[str, str]:
    """An object URI → (URI of the store that holds it, key): `file:///x/stores/aws/runs/r1/a.csv` →
    (`file:///x/stores/aws`, `runs/r1/a.csv`); `s3://skyfuse-aws/runs/r1/a.csv` → (`s3://skyfuse-aws`,
    `runs/r1/a.csv`)."""
    return _backend(uri).split(uri)


def fetch(uri: str, sha256: str | None = None) -> bytes:
    """The bytes of the object at `uri`, verified against `sha256` when given."""
    root, key = split_uri(uri)
    return open_store(root).get(key, sha256)
