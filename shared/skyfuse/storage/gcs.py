"""Google Cloud Storage (or a local GCS emulator): `gs://BUCKET[/PREFIX]`, through google-cloud-storage.

Endpoint: the `endpoint` argument, else `$STORAGE_EMULATOR_HOST` (the variable Google's libraries
read for an emulator), both with anonymous credentials and the project `project` /
`$GOOGLE_CLOUD_PROJECT` / `skyfuse`; else Google Cloud with Application Default Credentials.

Objects up to 8 MiB are one multipart upload, larger ones a resumable upload in 8 MiB chunks; GCS
makes either visible only when complete (atomic). `create` uploads with `ifGenerationMatch=0`, so
GCS itself refuses to replace an existing object. A read is one request (one generation, crc32c
checked) whose body streams in.
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from skyfuse.storage.base import NotFound, ObjectInfo, StoreError, sha256_of
from skyfuse.storage.cloud import CHUNK, CloudStore, is_loopback, no_bucket, split_object_uri, unreachable

if TYPE_CHECKING:
    from google.api_core.retry import Retry
    from google.cloud.storage import Blob, Bucket, Client  # untyped package: Any to the type checker

TIMEOUT_S = (10, 120)  # (connect, read) per request


@functools.lru_cache(maxsize=16)
def _client(endpoint: str | None, project: str | None) -> Client:
    from google.cloud import storage

    if endpoint:
        from google.auth.credentials import AnonymousCredentials

        anonymous = AnonymousCredentials()  # type: ignore[no-untyped-call]  # google-auth leaves __init__ unannotated
        return storage.Client(project=project or "skyfuse", credentials=anonymous,
                              client_options={"api_endpoint": endpoint})
    return storage.Client(project=project)


def _retry(local: bool) -> Retry:
    from google.cloud.storage.retry import DEFAULT_RETRY

    # The library retries transient errors (connection errors included) for up to 120 s by default;
    # an emulator on this machine that refuses connections is not coming back within seconds.
    retry: Retry = DEFAULT_RETRY.with_timeout(3.0 if local else 120.0)
    return retry


class GCSStore(CloudStore):
    scheme = "gs"

    def __init__(self, uri: str, *, endpoint: str | None = None, project: str | None = None):
        super().__init__(uri)
        endpoint = endpoint or os.environ.get("STORAGE_EMULATOR_HOST") or None
        if endpoint and "://" not in endpoint:
            endpoint = f"http://{endpoint}"
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.project = project or os.environ.get("GOOGLE_CLOUD_PROJECT") or None
        self._retry = _retry(is_loopback(self.endpoint))
        self._bucket_handle: Bucket | None = None

    @staticmethod
    def split(uri: str) -> tuple[str, str]:
        return split_object_uri(uri, "gs")

    @property
    def _bucket(self) -> Bucket:
        if self._bucket_handle is None:
            with self._errors("connect to"):
                self._bucket_handle = _client(self.endpoint, self.project).bucket(self.bucket)
        return self._bucket_handle

    def _blob(self, name: str, *, upload: bool = False) -> Blob:
        # Uploads over 8 MiB go resumable in CHUNK pieces. Reads are one request whose body streams
        # in: ranged chunk requests would not pin the object's generation, so a reader racing a
        # writer could get half of each, and they skip the library's crc32c check.
        return self._bucket.blob(name, chunk_size=CHUNK if upload else None)

    # ------------------------------------------------------------------ errors ---

    def _bucket_missing(self) -> bool:
        try:
            return not self._bucket.exists(retry=self._retry, timeout=TIMEOUT_S)
        except Exception:  # noqa: BLE001 - only a hint for the error message
            return False

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        import requests
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as auth_exc

        where = self.uri_for(key) if key else self.uri
        try:
            yield
        except gexc.NotFound as exc:
            if self._bucket_missing():
                raise no_bucket("bucket", self.bucket, self.endpoint, self.uri) from None
            if key is not None:
                raise NotFound(f"no object {where}") from None
            raise StoreError(f"GCS could not {action} {where}: {exc.message}") from exc
        except (gexc.Forbidden, gexc.Unauthorized, auth_exc.DefaultCredentialsError) as exc:
            raise StoreError(f"GCS refused to {action} {where}: {exc}; check the Google credentials") from None
        except gexc.RetryError as exc:
            cause = exc.cause if exc.cause is not None else exc
            if isinstance(cause, (requests.ConnectionError, requests.Timeout, auth_exc.TransportError)):
                raise unreachable("GCS", self.endpoint, self.uri, cause) from None
            raise StoreError(f"GCS could not {action} {where}: {cause}") from exc
        except (requests.ConnectionError, requests.Timeout, auth_exc.TransportError) as exc:
            raise unreachable("GCS", self.endpoint, self.uri, exc) from None
        except gexc.GoogleAPICallError as exc:
            raise StoreError(f"GCS could not {action} {where}: {exc.code} {exc.message}") from exc

    # ------------------------------------------------------------------ writes ---

    def put(self, key: str, data: bytes) -> ObjectInfo:
        blob = self._blob(self._name(key), upload=True)
        with self._errors("write", key):
            blob.upload_from_string(data, content_type="application/octet-stream", retry=self._retry,
                                    timeout=TIMEOUT_S)
        return ObjectInfo(self.uri_for(key), sha256_of(data), len(data))

    def create(self, key: str, data: bytes) -> bool:
        from google.api_core import exceptions as gexc

        blob = self._blob(self._name(key), upload=True)
        with self._errors("create", key):
            try:
                blob.upload_from_string(data, content_type="application/octet-stream", if_generation_match=0,
                                        retry=self._retry, timeout=TIMEOUT_S)
            except gexc.PreconditionFailed:
                return False
        return True

    def delete(self, key: str) -> None:
        """Remove the object at `key`, if there is one (not part of `Store`: cleanup and retention)."""
        from google.api_core import exceptions as gexc

        blob = self._blob(self._name(key))
        with self._errors("delete", key):
            try:
                blob.delete(retry=self._retry, timeout=TIMEOUT_S)
            except gexc.NotFound:
                if self._bucket_missing():
                    raise

    # ------------------------------------------------------------------- reads ---

    def read(self, key: str) -> bytes:
        blob = self._blob(self._name(key))
        with self._errors("read", key):
            data: bytes = blob.download_as_bytes(retry=self._retry, timeout=TIMEOUT_S)
            return data

    def exists(self, key: str) -> bool:
        blob = self._blob(self._name(key))
        with self._errors("look up", key):
            found: bool = blob.exists(retry=self._retry, timeout=TIMEOUT_S)
            return found

    def list(self, prefix: str) -> list[str]:
        with self._errors("list"):
            names = [b.name for b in self._bucket.list_blobs(prefix=self._list_prefix(prefix),
                                                               retry=self._retry, timeout=TIMEOUT_S)]
        return self._keys(prefix, names)
