"""The cloud stores without a server: URIs, dispatch, key checks, listing semantics, and the error an
unreachable endpoint gives (a closed port on 127.0.0.1)."""
from __future__ import annotations

import socket

import pytest

from skyfuse.storage import StoreError, Unreachable, open_store, split_uri
from skyfuse.storage.azure import AzureStore
from skyfuse.storage.cloud import is_loopback, split_bucket_uri
from skyfuse.storage.file import FileStore
from skyfuse.storage.gcs import GCSStore
from skyfuse.storage.s3 import S3Store

CLOUD_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "STORAGE_EMULATOR_HOST", "AZURE_STORAGE_CONNECTION_STRING",
              "AZURE_STORAGE_ACCOUNT_URL", "AWS_PROFILE")


def azurite(port: int) -> str:
    return ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUz"
            f"FT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;")


@pytest.fixture
def emulated(monkeypatch):
    """Endpoints on this machine for every cloud (nothing needs to listen: opening a store makes no call)."""
    for var in CLOUD_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:9023")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite(10000))


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("uri", "cls", "bucket", "prefix", "normal"), [
    ("s3://skyfuse-aws", S3Store, "skyfuse-aws", "", "s3://skyfuse-aws"),
    ("s3://skyfuse-aws/", S3Store, "skyfuse-aws", "", "s3://skyfuse-aws"),
    ("gs://skyfuse-gcp/team/a/", GCSStore, "skyfuse-gcp", "team/a", "gs://skyfuse-gcp/team/a"),
    ("az://skyfuse-azure/x", AzureStore, "skyfuse-azure", "x", "az://skyfuse-azure/x"),
])
def test_open_store_picks_the_backend_by_scheme(emulated, uri, cls, bucket, prefix, normal):
    store = open_store(uri)
    assert type(store) is cls
    assert (store.bucket, store.prefix, store.uri) == (bucket, prefix, normal)
    assert store.uri_for("runs/r1/a.csv") == f"{normal}/runs/r1/a.csv"


def test_endpoints_come_from_the_environment(emulated):
    assert open_store("s3://b").endpoint == "http://127.0.0.1:4566"
    assert open_store("gs://b").endpoint == "http://127.0.0.1:9023"  # a bare host:port gets http://
    assert open_store("az://c").endpoint == "http://127.0.0.1:10000/devstoreaccount1"


def test_constructor_arguments_win_over_the_environment(emulated):
    assert S3Store("s3://b", endpoint_url="http://127.0.0.1:1234").endpoint == "http://127.0.0.1:1234"
    assert GCSStore("gs://b", endpoint="http://127.0.0.1:1235").endpoint == "http://127.0.0.1:1235"
    assert AzureStore("az://c", connection_string=azurite(1236)).endpoint == "http://127.0.0.1:1236/devstoreaccount1"


@pytest.mark.parametrize(("uri", "root", "key"), [
    ("s3://skyfuse-aws/runs/r1/shards/0.csv", "s3://skyfuse-aws", "runs/r1/shards/0.csv"),
    ("gs://skyfuse-gcp/team/runs/r1/m.onnx", "gs://skyfuse-gcp", "team/runs/r1/m.onnx"),
    ("az://skyfuse-azure/m.onnx", "az://skyfuse-azure", "m.onnx"),
    ("file:///x/stores/aws/runs/r1/a.csv", "file:///x/stores/aws", "runs/r1/a.csv"),
])
def test_split_uri_gives_the_bucket_and_the_key(uri, root, key):
    assert split_uri(uri) == (root, key)


@pytest.mark.parametrize("uri", ["s3://skyfuse-aws", "gs://skyfuse-gcp/", "az://", "ftp://host/a", "skyfuse-aws/a"])
def test_split_uri_refuses_what_names_no_object(uri):
    with pytest.raises(StoreError):
        split_uri(uri)


def test_unknown_scheme_lists_the_supported_ones():
    with pytest.raises(StoreError, match=r"s3://BUCKET.*gs://BUCKET.*az://CONTAINER"):
        open_store("hdfs://x")


@pytest.mark.parametrize("key", ["", "/abs", "dir/"])
def test_bad_keys_are_refused(emulated, key):
    with pytest.raises(StoreError, match="bad key"):
        open_store("s3://b").read(key)


def test_listing_treats_the_prefix_as_a_folder(emulated):
    store = open_store("s3://b/team")
    names = ["team/runs/r1/a", "team/runs/r1/sub/b", "team/runs/r10/c", "team/runs/r1"]
    assert store._list_prefix("runs/r1") == "team/runs/r1"
    assert store._list_prefix("") == "team/"
    assert store._keys("runs/r1", names) == ["runs/r1", "runs/r1/a", "runs/r1/sub/b"]
    assert store._keys("runs/r1/", names[:2]) == ["runs/r1/a", "runs/r1/sub/b"]


def test_split_bucket_uri():
    assert split_bucket_uri("s3://b/p/q/", "s3") == ("b", "p/q")
    with pytest.raises(StoreError):
        split_bucket_uri("gs://b", "s3")


@pytest.mark.parametrize(("endpoint", "local"), [
    ("http://127.0.0.1:4566", True), ("localhost:9023", True), ("http://[::1]:10000/devstoreaccount1", True),
    ("https://s3.us-east-1.amazonaws.com", False), (None, False), ("http://10.0.0.5:4566", False),
])
def test_is_loopback(endpoint, local):
    assert is_loopback(endpoint) is local


def test_azure_without_an_account_says_what_to_set(monkeypatch):
    for var in CLOUD_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(StoreError, match="AZURE_STORAGE_CONNECTION_STRING"):
        open_store("az://skyfuse-azure")


@pytest.mark.parametrize("cloud", ["s3", "gcs", "azure"])
def test_a_stopped_emulator_is_unreachable_and_says_make_emulators_up(monkeypatch, closed_port, cloud):
    for var in CLOUD_VARS:
        monkeypatch.delenv(var, raising=False)
    store = {
        "s3": lambda: S3Store("s3://skyfuse-aws", endpoint_url=f"http://127.0.0.1:{closed_port}"),
        "gcs": lambda: GCSStore("gs://skyfuse-gcp", endpoint=f"http://127.0.0.1:{closed_port}"),
        "azure": lambda: AzureStore("az://skyfuse-azure", connection_string=azurite(closed_port)),
    }[cloud]()
    with pytest.raises(Unreachable, match=rf"127\.0\.0\.1:{closed_port}.*make emulators-up"):
        store.read("runs/r1/a.csv")


def test_the_file_store_is_unchanged(tmp_path):
    assert type(open_store(f"file://{tmp_path}")) is FileStore
