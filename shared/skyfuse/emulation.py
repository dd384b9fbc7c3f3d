"""The fleet against real emulators of each cloud (`skyfuse demo --emulate`, `make run-emulated`):
Apache Kafka for the bus, LocalStack S3, fake-gcs-server and Azurite for the three stores, as
`infra/emulators/emulators.sh up` starts them on 127.0.0.1."""
from __future__ import annotations

import os

from skyfuse.config import Fleet

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


def apply(fleet: Fleet) -> Fleet:
    """The same fleet with each cloud's store in its provider's emulator and the bus on Kafka."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)  # children (inference servers) inherit them
    clouds = {name: c.model_copy(update={"store": STORES[c.provider]}) for name, c in fleet.clouds.items()}
    bus = fleet.bus.model_copy(update={"backend": "kafka"})
    return fleet.model_copy(update={"clouds": clouds, "bus": bus})
