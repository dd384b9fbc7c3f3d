"""Create the skyfuse buckets in the local emulators, and the Route 53 hosted zone of the router's
DNS records in LocalStack (idempotent): run by `emulators.sh up` with the project's venv, through
each cloud's own Python SDK.

    python infra/emulators/bootstrap.py [--s3 URL] [--gcs URL] [--azure CONNECTION_STRING]
                                        [--route53 URL] [--aws-bucket skyfuse-aws]
                                        [--gcp-bucket skyfuse-gcp] [--azure-container skyfuse-azure]
                                        [--dns-zone skyfuse.example.]

Only the emulators named are touched. Exit status 1 (with the reason) when one cannot be set up.
"""
from __future__ import annotations

import argparse
import sys
import time

RETRY_S = 20  # an emulator that just answered its health check may still be loading a service


def _retrying(what: str, fn):
    deadline = time.monotonic() + RETRY_S
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - report whatever the SDK raised, after retrying
            if time.monotonic() > deadline:
                raise SystemExit(f"bootstrap: {what} failed: {type(exc).__name__}: {exc}") from None
            time.sleep(0.5)


def s3_bucket(endpoint: str, bucket: str) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                      aws_secret_access_key="test", config=Config(s3={"addressing_style": "path"}))

    def create():
        try:
            s3.head_bucket(Bucket=bucket)
            return "exists"
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("404", "NoSuchBucket"):
                raise
        try:
            s3.create_bucket(Bucket=bucket)
            return "created"
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return "exists"
            raise

    print(f"bootstrap: s3://{bucket} {_retrying(f's3://{bucket} at {endpoint}', create)} ({endpoint})")


def gcs_bucket(endpoint: str, bucket: str) -> None:
    from google.api_core import exceptions as gexc
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="skyfuse", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": endpoint})

    def create():
        try:
            client.create_bucket(bucket)
            return "created"
        except gexc.Conflict:
            return "exists"

    print(f"bootstrap: gs://{bucket} {_retrying(f'gs://{bucket} at {endpoint}', create)} ({endpoint})")


def azure_container(conn: str, container: str) -> None:
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(conn, retry_total=0)

    def create():
        try:
            service.create_container(container)
            return "created"
        except ResourceExistsError:
            return "exists"

    print(f"bootstrap: az://{container} {_retrying(f'az://{container} at {service.url}', create)} ({service.url})")


def route53_zone(endpoint: str, zone: str) -> None:
    import boto3

    route53 = boto3.client("route53", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                           aws_secret_access_key="test")

    def create():
        found = route53.list_hosted_zones_by_name(DNSName=zone, MaxItems="1")["HostedZones"]
        if found and found[0]["Name"] == zone:
            return "exists"
        route53.create_hosted_zone(Name=zone, CallerReference=f"skyfuse-bootstrap-{zone}")
        return "created"

    print(f"bootstrap: route53 zone {zone} {_retrying(f'route53 zone {zone} at {endpoint}', create)} ({endpoint})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--s3", metavar="URL", help="LocalStack endpoint, e.g. http://127.0.0.1:4566")
    p.add_argument("--gcs", metavar="URL", help="GCS emulator endpoint, e.g. http://127.0.0.1:9023")
    p.add_argument("--azure", metavar="CONNECTION_STRING", help="Azurite connection string")
    p.add_argument("--route53", metavar="URL", help="LocalStack endpoint for the hosted zone, e.g. http://127.0.0.1:4566")
    p.add_argument("--aws-bucket", default="skyfuse-aws")
    p.add_argument("--gcp-bucket", default="skyfuse-gcp")
    p.add_argument("--azure-container", default="skyfuse-azure")
    p.add_argument("--dns-zone", default="skyfuse.example.", help="the zone `skyfuse up --emulate` sets records in "
                                                                   "(skyfuse.dev.emulation.DNS_ZONE)")
    args = p.parse_args(argv)
    try:
        if args.s3:
            s3_bucket(args.s3, args.aws_bucket)
        if args.gcs:
            gcs_bucket(args.gcs, args.gcp_bucket)
        if args.azure:
            azure_container(args.azure, args.azure_container)
        if args.route53:
            route53_zone(args.route53, args.dns_zone.rstrip(".") + ".")
    except ImportError as exc:
        raise SystemExit(f"bootstrap: {exc}: the cloud SDKs are missing from {sys.executable}; "
                         "run `make install`") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
