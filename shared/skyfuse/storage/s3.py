"""Amazon S3 (or LocalStack): `s3://BUCKET[/PREFIX]`, through boto3.

Endpoint: the `endpoint_url` argument, else `$AWS_ENDPOINT_URL_S3`, else `$AWS_ENDPOINT_URL` (both read
by boto3 itself too), else AWS. Region: `region`, else `$AWS_REGION` / `$AWS_DEFAULT_REGION`, else
us-east-1. Credentials: boto3's usual chain (`$AWS_ACCESS_KEY_ID`…, profiles, roles); against an
endpoint on this machine (LocalStack) with none in the environment, `test`/`test`.

Objects up to 8 MiB are one PutObject; larger ones a multipart upload in 8 MiB parts, which S3 makes
visible only when complete (atomic either way). `create` sends `If-None-Match: *` (on PutObject, or on
CompleteMultipartUpload), so S3 itself refuses to replace an existing key. Reads stream the body in
1 MiB chunks.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from skyfuse.storage.base import NotFound, ObjectInfo, StoreError, sha256_of
from skyfuse.storage.cloud import CHUNK, CloudStore, is_loopback, no_bucket, split_object_uri, unreachable

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

CONFLICT_RETRIES = 5  # S3 answers 409 ConditionalRequestConflict while a racing conditional write lands


@functools.lru_cache(maxsize=16)
def _client(endpoint: str | None, region: str, access_key: str | None, secret_key: str | None) -> Any:
    """A boto3 S3 client (boto3 ships no types)."""
    import boto3
    from botocore.config import Config

    local = is_loopback(endpoint)
    config = Config(
        region_name=region,
        s3={"addressing_style": "path"} if endpoint else {},
        retries={"mode": "standard", "max_attempts": 2 if local else 5},
        connect_timeout=5 if local else 20,
        read_timeout=60,
        max_pool_connections=16,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config,
                                          aws_access_key_id=access_key, aws_secret_access_key=secret_key)


class S3Store(CloudStore):
    scheme = "s3"

    def __init__(self, uri: str, *, endpoint_url: str | None = None, region: str | None = None):
        super().__init__(uri)
        env = os.environ
        self.endpoint = endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        self.region = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        key = secret = None
        if is_loopback(self.endpoint) and not env.get("AWS_ACCESS_KEY_ID") and not env.get("AWS_PROFILE"):
            key = secret = "test"  # LocalStack accepts any credentials
        self._client = _client(self.endpoint, self.region, key, secret)

    @staticmethod
    def split(uri: str) -> tuple[str, str]:
        return split_object_uri(uri, "s3")

    # ------------------------------------------------------------------ errors ---

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        try:
            yield
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            if code == "NoSuchBucket":
                raise no_bucket("bucket", self.bucket, self.endpoint, self.uri) from None
            if key is not None and code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"no object {self.uri_for(key)}") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "403"):
                raise StoreError(f"S3 refused to {action} {self.uri_for(key) if key else self.uri}: {code}: "
                                 f"{err.get('Message', '')}; check the AWS credentials") from None
            raise StoreError(f"S3 could not {action} {self.uri_for(key) if key else self.uri}: {code}: "
                             f"{err.get('Message', exc)}") from exc
        except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError) as exc:
            raise unreachable("S3", self.endpoint, self.uri, exc) from None
        except NoCredentialsError:
            raise StoreError(f"no AWS credentials to {action} {self.uri}: set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY (or a profile)") from None
        except BotoCoreError as exc:
            raise StoreError(f"S3 could not {action} {self.uri_for(key) if key else self.uri}: {exc}") from exc

    @staticmethod
    def _code(exc: ClientError) -> str:
        return str(exc.response.get("Error", {}).get("Code", ""))

    # ------------------------------------------------------------------ writes ---

    def _write(self, name: str, data: bytes, *, if_absent: bool) -> None:
        cond = {"IfNoneMatch": "*"} if if_absent else {}
        if len(data) <= CHUNK:
            self._client.put_object(Bucket=self.bucket, Key=name, Body=data, **cond)
            return
        upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=name)["UploadId"]
        try:
            parts = []
            for number, offset in enumerate(range(0, len(data), CHUNK), start=1):
                part = self._client.upload_part(Bucket=self.bucket, Key=name, UploadId=upload_id,
                                                PartNumber=number, Body=data[offset:offset + CHUNK])
                parts.append({"ETag": part["ETag"], "PartNumber": number})
            self._client.complete_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id,
                                                   MultipartUpload={"Parts": parts}, **cond)
        except BaseException:
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
            raise

    def put(self, key: str, data: bytes) -> ObjectInfo:
        name = self._name(key)
        with self._errors("write", key):
            self._write(name, data, if_absent=False)
        return ObjectInfo(self.uri_for(key), sha256_of(data), len(data))

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        name = self._name(key)
        with self._errors("create", key):
            for attempt in range(CONFLICT_RETRIES + 1):
                try:
                    self._write(name, data, if_absent=True)
                    return True
                except ClientError as exc:
                    code = self._code(exc)
                    if code in ("PreconditionFailed", "412"):
                        return False
                    if code != "ConditionalRequestConflict" or attempt == CONFLICT_RETRIES:
                        raise
                    time.sleep(0.05 * 2 ** attempt)
        return False  # unreachable: the loop returns or raises

    def delete(self, key: str) -> None:
        """Remove the object at `key`, if there is one (not part of `Store`: cleanup and retention)."""
        name = self._name(key)
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=name)

    # ------------------------------------------------------------------- reads ---

    def read(self, key: str) -> bytes:
        name = self._name(key)
        with self._errors("read", key):
            body = self._client.get_object(Bucket=self.bucket, Key=name)["Body"]
            buf = bytearray()
            try:
                for chunk in body.iter_chunks(1024 * 1024):
                    buf += chunk
            finally:
                body.close()
        return bytes(buf)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        name = self._name(key)
        with self._errors("look up", key):
            try:
                self._client.head_object(Bucket=self.bucket, Key=name)
                return True
            except ClientError as exc:
                if self._code(exc) in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

    def list(self, prefix: str) -> list[str]:
        names: list[str] = []
        with self._errors("list"):
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                            Prefix=self._list_prefix(prefix))
            for page in pages:
                names.extend(obj["Key"] for obj in page.get("Contents", ()))
        return self._keys(prefix, names)
