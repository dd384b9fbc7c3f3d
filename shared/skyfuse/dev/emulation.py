"""The fleet against real emulators of each cloud (`skyfuse demo --emulate`, `make run-emulated`):
Apache Kafka for the bus, LocalStack S3, fake-gcs-server and Azurite for the three stores, and
LocalStack's Route 53 for the DNS front door the router function sets, as
`infra/emulators/emulators.sh up` starts them on 127.0.0.1 (it also creates the hosted zone)."""
from __future__ import annotations

import os

from skyfuse.config import Fleet, replace

# What `infra/emulators/emulators.sh env` prints; set only where the environment has no value.
ENVIRONMENT = {
    "AWS_ENDPOINT_URL": "http://127.0.0.1:4566",
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9023",
    "AZURE_STORAGE_CONNECTION_STRING": (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1O"
        "UzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"),
}
STORES = {"aws": "s3://skyfuse-aws", "gcp": "gs://skyfuse-gcp", "azure": "az://skyfuse-azure"}
DNS_ZONE = "skyfuse.example."  # what infra/emulators/bootstrap.py creates in LocalStack


def apply(fleet: Fleet) -> Fleet:
    """The same fleet with each cloud's store in its provider's emulator, the bus on Kafka, and the
    router's weighted DNS records in LocalStack's Route 53 (`api.skyfuse.example.` unless `[dns]`
    names another record of an existing zone)."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)  # children (inference servers) inherit them
    clouds = {name: replace(c, store=STORES[c.provider]) for name, c in fleet.clouds.items()}
    bus = replace(fleet.bus, backend="kafka")
    named = fleet.dns.record and (fleet.dns.zone or fleet.dns.hosted_zone_id)
    dns = fleet.dns if named else replace(fleet.dns, zone=DNS_ZONE, record=f"api.{DNS_ZONE}")
    dns = replace(dns, provider="route53", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    return replace(fleet, clouds=clouds, bus=bus, dns=dns)


def api_gateway(endpoint: str, name: str = "skyfuse-inference", stage: str = "local") -> str:
    """Put LocalStack's API Gateway in front of the AWS inference endpoint, the way it is called in
    AWS: a REST API whose `{proxy+}` resource forwards every method to `endpoint` (an HTTP proxy
    integration). Returns the invoke URL; `POST {url}/predict` reaches the function."""
    import boto3

    gateway_url = os.environ.get("AWS_ENDPOINT_URL", ENVIRONMENT["AWS_ENDPOINT_URL"])
    region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("apigateway", endpoint_url=gateway_url, region_name=region)
    api = next((a for a in client.get_rest_apis(limit=500)["items"] if a["name"] == name), None)
    if api is not None:  # one API per name: replace it, its target port may have changed
        client.delete_rest_api(restApiId=api["id"])
    api_id = client.create_rest_api(name=name, description="skyfuse inference (aws) through API Gateway")["id"]
    root = next(r["id"] for r in client.get_resources(restApiId=api_id)["items"] if r["path"] == "/")
    proxy = client.create_resource(restApiId=api_id, parentId=root, pathPart="{proxy+}")["id"]
    client.put_method(restApiId=api_id, resourceId=proxy, httpMethod="ANY", authorizationType="NONE",
                      requestParameters={"method.request.path.proxy": True})
    client.put_integration(restApiId=api_id, resourceId=proxy, httpMethod="ANY", type="HTTP_PROXY",
                           integrationHttpMethod="ANY", uri=f"{endpoint.rstrip('/')}/{{proxy}}",
                           requestParameters={"integration.request.path.proxy": "method.request.path.proxy"})
    client.create_deployment(restApiId=api_id, stageName=stage)
    return f"{gateway_url.rstrip('/')}/_aws/execute-api/{api_id}/{stage}"
