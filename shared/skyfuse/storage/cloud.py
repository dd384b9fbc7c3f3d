"""What the three cloud object stores share: `scheme://bucket[/prefix]` URIs, key checks, listing
with the file store's folder semantics, and the error messages.

A store URI names a bucket (S3, GCS) or container (Azure) and optionally a prefix inside it; keys are
relative to that prefix. An object's URI is `scheme://bucket/prefix/key`, and any such URI can be
read back with `skyfuse.storage.fetch` by whichever cloud holds the credentials and endpoint.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from skyfuse.storage.base import Store, StoreError

# Objects larger than this go up (and come down) in parts of this size: S3 multipart upload,
# GCS resumable upload / chunked download, Azure staged blocks / ranged reads.
CHUNK = 8 * 1024 * 1024
EMULATOR_HINT = "is the emulator running? Start the emulators with `make emulators-up`"
BUCKETS_HINT = "`make emulators-up` creates skyfuse-aws (S3), skyfuse-gcp (GCS) and skyfuse-azure (Azure)"


class Unreachable(StoreError):
    """The store's endpoint did not answer (connection refused, timed out, name not resolved)."""


def split_bucket_uri(uri: str, scheme: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` → ('bucket', 'some/prefix')."""
    if not uri.startswith(f"{scheme}://"):
        raise StoreError(f"{uri!r} is not a {scheme}:// URI")
    rest = uri[len(scheme) + 3:]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StoreError(f"{uri!r} names no bucket: expected {scheme}://BUCKET[/PREFIX]")
    return bucket, prefix.strip("/")


def split_object_uri(uri: str, scheme: str) -> tuple[str, str]:
    """`s3://bucket/runs/r1/a.csv` → ('s3://bucket', 'runs/r1/a.csv'): the bucket's store and the key."""
    bucket, key = split_bucket_uri(uri, scheme)
    if not key:
        raise StoreError(f"{uri!r} names a bucket, not an object: expected {scheme}://BUCKET/KEY")
    return f"{scheme}://{bucket}", key


def is_loopback(endpoint: str | None) -> bool:
    """Whether `endpoint` (a URL or host[:port]) is on this machine: an emulator, not a cloud."""
    if not endpoint:
        return False
    host = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}").hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def unreachable(service: str, endpoint: str | None, store_uri: str, exc: BaseException) -> Unreachable:
    hint = EMULATOR_HINT if is_loopback(endpoint) else "check the network, the endpoint setting and the credentials"
    return Unreachable(f"cannot reach {service} at {endpoint or 'its default endpoint'} for {store_uri}: "
                       f"{type(exc).__name__}: {exc} — {hint}")


def no_bucket(kind: str, bucket: str, endpoint: str | None, store_uri: str) -> StoreError:
    hint = BUCKETS_HINT if is_loopback(endpoint) else f"create the {kind} first"
    where = endpoint or "its default endpoint"
    return StoreError(f"the {kind} {bucket!r} of {store_uri} does not exist at {where}: {hint}")


class CloudStore(Store):
    """A bucket (or a prefix in one) of an object store; subclasses talk to the cloud's SDK."""

    scheme: str

    def __init__(self, uri: str):
        self.bucket, self.prefix = split_bucket_uri(uri, self.scheme)
        self.uri = f"{self.scheme}://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def _name(self, key: str) -> str:
        """The object name in the bucket for `key`."""
        if not key or key.startswith("/") or key.endswith("/"):
            raise StoreError(f"bad key {key!r} for {self.uri}: keys are non-empty `a/b/c` paths")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _list_prefix(self, prefix: str) -> str:
        """The name prefix to ask the cloud to list for `prefix`."""
        if prefix.startswith("/"):
            raise StoreError(f"bad prefix {prefix!r} for {self.uri}: keys are `a/b/c` paths")
        return f"{self.prefix}/{prefix}" if self.prefix else prefix

    def _keys(self, prefix: str, names: Iterable[str]) -> list[str]:
        """Sorted keys, from the names the cloud listed, as `FileStore.list` gives them: `prefix` is a
        folder (`runs/r1` holds `runs/r1/a`, not `runs/r10/a`) or, when an object has that very key,
        that object; `""` is every key."""
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = (name[strip:] for name in names)
        if prefix and not prefix.endswith("/"):
            return sorted(k for k in keys if k == prefix or k.startswith(prefix + "/"))
        return sorted(k for k in keys if k and not k.endswith("/"))
