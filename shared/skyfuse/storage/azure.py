"""Azure Blob Storage (or Azurite): `az://CONTAINER[/PREFIX]`, through azure-storage-blob.

The storage account is the one of the `connection_string` argument, else of
`$AZURE_STORAGE_CONNECTION_STRING` (the variable Azure Functions and Azurite use); or the
`account_url` argument (else `$AZURE_STORAGE_ACCOUNT_URL`) with the `credential` argument (a key,
SAS token or azure-identity credential).

Objects up to 8 MiB are one Put Blob, larger ones staged 4 MiB blocks committed by one Put Block
List; Azure makes either visible only when committed (atomic). `create` uploads with
`If-None-Match: *`, so Azure itself refuses to replace an existing blob. Reads of large blobs come
down in 8 MiB ranges, two at a time, all pinned to the first range's ETag (a blob replaced meanwhile
is read again from the start).
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Hashable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from skyfuse.storage.base import NotFound, ObjectInfo, StoreError, sha256_of
from skyfuse.storage.cloud import CHUNK, CloudStore, is_loopback, no_bucket, split_object_uri, unreachable

if TYPE_CHECKING:
    from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential, TokenCredential
    from azure.core.exceptions import AzureError
    from azure.storage.blob import BlobServiceClient

    class HashableTokenCredential(TokenCredential, Hashable, Protocol):
        """An azure-identity credential, as a key of the client cache."""

    # a key, a SAS token or an azure-identity credential
    Credential = str | AzureNamedKeyCredential | AzureSasCredential | HashableTokenCredential

BLOCK = 4 * 1024 * 1024
READ_ATTEMPTS = 3


def _endpoint_of(connection_string: str) -> str | None:
    """The blob endpoint a connection string names (for messages and the emulator check)."""
    fields = dict(part.split("=", 1) for part in connection_string.split(";") if "=" in part)
    if fields.get("BlobEndpoint"):
        return fields["BlobEndpoint"]
    if fields.get("UseDevelopmentStorage", "").lower() == "true":
        return "http://127.0.0.1:10000/devstoreaccount1"
    if fields.get("AccountName"):
        suffix = fields.get("EndpointSuffix", "core.windows.net")
        return f"{fields.get('DefaultEndpointsProtocol', 'https')}://{fields['AccountName']}.blob.{suffix}"
    return None


def _error_code(exc: AzureError) -> str | None:
    """The storage error code (`ContainerNotFound`, ...) azure-storage-blob sets on the errors it raises;
    azure-core's exception types do not declare it."""
    code: str | None = exc.error_code  # type: ignore[attr-defined]  # set by azure-storage-blob, undeclared
    return code


@functools.lru_cache(maxsize=16)
def _service(connection_string: str | None, account_url: str | None,
             credential: Credential | None) -> BlobServiceClient:
    from azure.storage.blob import BlobServiceClient, ExponentialRetry

    endpoint = _endpoint_of(connection_string) if connection_string else account_url
    options: dict[str, Any] = dict(max_single_put_size=CHUNK, max_block_size=BLOCK, max_single_get_size=CHUNK,
                                   max_chunk_get_size=CHUNK)
    if is_loopback(endpoint):
        # Azure's storage default waits 15 s before its first retry: far too long for an emulator
        # that refuses connections because it is not running.
        quick = ExponentialRetry(initial_backoff=0.2,  # type: ignore[arg-type]  # annotated int; seconds, any number
                                 increment_base=2, retry_total=1,
                                 random_jitter_range=0.1)  # type: ignore[arg-type]  # annotated int, as above
        options.update(retry_policy=quick, connection_timeout=5)
    if connection_string:
        return BlobServiceClient.from_connection_string(connection_string, **options)
    if account_url is None:
        raise ValueError("neither a connection string nor an account URL")
    return BlobServiceClient(account_url, credential=credential, **options)


class AzureStore(CloudStore):
    scheme = "az"

    def __init__(self, uri: str, *, connection_string: str | None = None, account_url: str | None = None,
                 credential: Credential | None = None):
        super().__init__(uri)
        env = os.environ
        connection_string = connection_string or (None if account_url else env.get("AZURE_STORAGE_CONNECTION_STRING"))
        account_url = account_url or (None if connection_string else env.get("AZURE_STORAGE_ACCOUNT_URL"))
        if not connection_string and not account_url:
            raise StoreError(f"no Azure storage account for {self.uri}: set AZURE_STORAGE_CONNECTION_STRING "
                             "(for Azurite: `eval \"$(bash infra/emulators/emulators.sh env)\"`)")
        self.endpoint = _endpoint_of(connection_string) if connection_string else account_url
        try:
            service = _service(connection_string, account_url, credential)
        except ValueError as exc:  # a malformed connection string
            raise StoreError(f"bad Azure storage settings for {self.uri}: {exc}") from None
        self._container = service.get_container_client(self.bucket)

    @staticmethod
    def split(uri: str) -> tuple[str, str]:
        return split_object_uri(uri, "az")

    # ------------------------------------------------------------------ errors ---

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        from azure.core.exceptions import (
            AzureError,
            ClientAuthenticationError,
            HttpResponseError,
            ResourceNotFoundError,
            ServiceRequestError,
            ServiceResponseError,
        )

        where = self.uri_for(key) if key else self.uri
        try:
            yield
        except ResourceNotFoundError as exc:
            if _error_code(exc) == "ContainerNotFound":
                raise no_bucket("container", self.bucket, self.endpoint, self.uri) from None
            if key is not None:
                raise NotFound(f"no object {where}") from None
            raise StoreError(f"Azure could not {action} {where}: {_error_code(exc) or exc.reason}") from exc
        except ClientAuthenticationError as exc:
            raise StoreError(f"Azure refused to {action} {where}: {_error_code(exc) or exc.reason}; "
                             "check the storage account key or token") from None
        except (ServiceRequestError, ServiceResponseError) as exc:
            raise unreachable("Azure Blob Storage", self.endpoint, self.uri, exc) from None
        except HttpResponseError as exc:
            raise StoreError(f"Azure could not {action} {where}: "
                             f"{exc.status_code} {_error_code(exc) or exc.reason}") from exc
        except AzureError as exc:
            raise StoreError(f"Azure could not {action} {where}: {exc}") from exc

    # ------------------------------------------------------------------ writes ---

    def put(self, key: str, data: bytes) -> ObjectInfo:
        name = self._name(key)
        with self._errors("write", key):
            self._container.upload_blob(name, data, length=len(data), overwrite=True, max_concurrency=2)
        return ObjectInfo(self.uri_for(key), sha256_of(data), len(data))

    def create(self, key: str, data: bytes) -> bool:
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError

        name = self._name(key)
        with self._errors("create", key):
            try:
                # overwrite=False sends If-None-Match: * with Put Blob, or with Put Block List when staged
                self._container.upload_blob(name, data, length=len(data), overwrite=False, max_concurrency=2)
            except (ResourceExistsError, ResourceModifiedError):
                return False
        return True

    def delete(self, key: str) -> None:
        """Remove the object at `key`, if there is one (not part of `Store`: cleanup and retention)."""
        from azure.core.exceptions import ResourceNotFoundError

        name = self._name(key)
        with self._errors("delete", key):
            try:
                self._container.delete_blob(name)
            except ResourceNotFoundError as exc:
                if _error_code(exc) == "ContainerNotFound":
                    raise

    # ------------------------------------------------------------------- reads ---

    def read(self, key: str) -> bytes:
        from azure.core.exceptions import ResourceModifiedError

        name = self._name(key)
        with self._errors("read", key):
            for attempt in range(READ_ATTEMPTS):
                try:
                    return self._container.download_blob(name, max_concurrency=2).readall()
                except ResourceModifiedError:  # replaced between two ranges: read the new blob whole
                    if attempt == READ_ATTEMPTS - 1:
                        raise
        raise AssertionError("unreachable")

    def exists(self, key: str) -> bool:
        name = self._name(key)
        with self._errors("look up", key):
            return self._container.get_blob_client(name).exists()

    def list(self, prefix: str) -> list[str]:
        with self._errors("list"):
            names = list(self._container.list_blob_names(name_starts_with=self._list_prefix(prefix) or None))
        return self._keys(prefix, names)
