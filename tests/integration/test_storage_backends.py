"""The store contract, run against every backend: `file` (a folder), `s3` (LocalStack), `gcs`
(fake-gcs-server) and `azure` (Azurite).

The cloud backends carry the `emulators` marker and need the emulators `make emulators-up` starts
(`bash infra/emulators/emulators.sh up`); without them they FAIL with that command, never skip. The
endpoints are the usual variables, defaulting to the emulators' addresses: `$AWS_ENDPOINT_URL`,
`$STORAGE_EMULATOR_HOST`, `$AZURE_STORAGE_CONNECTION_STRING`. Every test works under a fresh prefix
of the buckets `skyfuse-aws`, `skyfuse-gcp` and container `skyfuse-azure`.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from urllib.parse import urlsplit

import pytest

from skyfuse.storage import IntegrityError, NotFound, StoreError, fetch, open_store, sha256_of, split_uri

AZURITE = ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
           "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
           "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;")

# backend → (variable, default, store URI of its bucket)
EMULATORS = {
    "s3": ("AWS_ENDPOINT_URL", "http://127.0.0.1:4566", "s3://skyfuse-aws"),
    "gcs": ("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9023", "gs://skyfuse-gcp"),
    "azure": ("AZURE_STORAGE_CONNECTION_STRING", AZURITE, "az://skyfuse-azure"),
}
NAMES = {"s3": "LocalStack (S3)", "gcs": "GCS emulator", "azure": "Azurite (Azure Blob)"}
BACKENDS = ["file", *EMULATORS]


def _param(name: str):
    return pytest.param(name, id=name, marks=() if name == "file" else pytest.mark.emulators)


def _host_port(name: str, value: str) -> tuple[str, int]:
    if name == "azure":
        fields = dict(p.split("=", 1) for p in value.split(";") if "=" in p)
        value = fields.get("BlobEndpoint", "http://127.0.0.1:10000")
    url = urlsplit(value if "://" in value else f"http://{value}")
    return url.hostname or "127.0.0.1", url.port or (443 if url.scheme == "https" else 80)


_checked: dict[str, str | None] = {}


def _require(name: str) -> None:
    """Fail (never skip) when the emulator of `name` does not accept connections."""
    if name not in _checked:
        var, default, _ = EMULATORS[name]
        host, port = _host_port(name, os.environ.get(var, default))
        try:
            socket.create_connection((host, port), timeout=2).close()
            _checked[name] = None
        except OSError as exc:
            _checked[name] = (f"no {NAMES[name]} at {host}:{port} ({exc.strerror or exc}): start the emulators "
                              f"with `make emulators-up` (`make test` does), or point ${var} at one")
    if _checked[name]:
        pytest.fail(_checked[name], pytrace=False)


@pytest.fixture
def emulator_env(monkeypatch):
    """The variables the cloud stores read, set to the emulators unless already set."""
    for var, default, _ in EMULATORS.values():
        monkeypatch.setenv(var, os.environ.get(var, default))
    for var, default in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                         ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(var, os.environ.get(var, default))


@pytest.fixture
def new_store(tmp_path, emulator_env):
    """Opens a store of a backend under a fresh prefix; empties the cloud ones afterwards (the emulators
    keep objects in memory)."""
    made = []

    def make(name: str):
        uid = uuid.uuid4().hex[:12]
        if name == "file":
            return open_store(f"file://{tmp_path / 'stores' / uid}")
        _require(name)
        made.append(store := open_store(f"{EMULATORS[name][2]}/test-{uid}"))
        return store

    yield make
    for store in made:
        with contextlib.suppress(StoreError):
            for key in store.list(""):
                store.delete(key)


@pytest.fixture(params=[_param(b) for b in BACKENDS])
def store(request, new_store):
    return new_store(request.param)


# ------------------------------------------------------------------ contract ---

def test_put_then_get_round_trip_with_sha256(store):
    data = b"id,label\n1,0\n2,1\n"
    info = store.put("runs/r1/shards/0.csv", data)
    assert (info.uri, info.sha256, info.size) == (store.uri_for("runs/r1/shards/0.csv"), sha256_of(data), len(data))
    assert store.get("runs/r1/shards/0.csv", info.sha256) == data
    assert store.read("runs/r1/shards/0.csv") == data
    assert store.exists("runs/r1/shards/0.csv")
    # put replaces the whole object
    assert store.put("runs/r1/shards/0.csv", b"v2").sha256 == sha256_of(b"v2")
    assert store.get("runs/r1/shards/0.csv", sha256_of(b"v2")) == b"v2"


def test_wrong_digest_is_an_integrity_error(store):
    store.put("models/m.onnx", b"the model")
    with pytest.raises(IntegrityError, match="expected " + sha256_of(b"another model")):
        store.get("models/m.onnx", sha256_of(b"another model"))


def test_missing_object_is_not_found(store):
    assert not store.exists("runs/none/a.csv")
    with pytest.raises(NotFound, match="runs/none/a.csv"):
        store.read("runs/none/a.csv")
    with pytest.raises(NotFound):
        store.get("runs/none/a.csv", sha256_of(b""))


def test_create_if_absent_is_true_once_and_keeps_the_first(store):
    assert store.create("runs/r1/fusing.claim", b"first") is True
    assert store.create("runs/r1/fusing.claim", b"second") is False
    assert store.read("runs/r1/fusing.claim") == b"first"


def test_create_if_absent_under_a_race_has_one_winner(store):
    results: list[bool] = []
    barrier = threading.Barrier(6)

    def claim(i: int) -> None:
        barrier.wait()
        results.append(store.create("runs/r1/race.claim", f"claimant {i}".encode()))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [False] * 5 + [True]
    assert store.read("runs/r1/race.claim").startswith(b"claimant ")


def test_list_by_prefix(store):
    for key in ("runs/r1/members/a.json", "runs/r1/members/b.json", "runs/r1/members/sub/c.json",
                "runs/r10/members/d.json", "runs/r2/x.json"):
        store.put(key, key.encode())
    members = ["runs/r1/members/a.json", "runs/r1/members/b.json", "runs/r1/members/sub/c.json"]
    assert store.list("runs/r1/members/") == members
    assert store.list("runs/r1/members") == members  # a folder, not a string prefix
    assert store.list("runs/r1") == members            # runs/r10 is not under runs/r1
    assert store.list("runs/r2/x.json") == ["runs/r2/x.json"]
    assert store.list("runs/r3/") == []
    assert store.list("") == sorted(members + ["runs/r10/members/d.json", "runs/r2/x.json"])


def test_large_object_round_trips_in_chunks(store):
    data = os.urandom(20 * 1024 * 1024 + 12345)  # more than two 8 MiB parts
    info = store.put("models/big.bin", data)
    assert info.size == len(data)
    assert store.get("models/big.bin", sha256_of(data)) == data
    # a conditional create of a multi-part object: refused at commit when the key exists
    assert store.create("models/big.claim", data) is True
    assert store.create("models/big.claim", data[::-1]) is False
    assert store.get("models/big.claim", sha256_of(data)) == data


def test_object_uri_splits_back_to_its_store(store):
    info = store.put("runs/r1/model.onnx", b"weights")
    root, key = split_uri(info.uri)
    assert open_store(root).read(key) == b"weights"
    assert fetch(info.uri, info.sha256) == b"weights"


# ------------------------------------------------------------ across clouds ---

PAIRS = [pytest.param(a, b, id=f"{a}-to-{b}", marks=pytest.mark.emulators)
         for a in BACKENDS for b in BACKENDS if a != b]


@pytest.mark.parametrize(("source", "target"), PAIRS)
def test_fetch_copies_an_object_from_one_clouds_store_to_another(source, target, new_store):
    src, dst = new_store(source), new_store(target)
    model = os.urandom(64 * 1024)
    announced = src.put("runs/r1/members/aws.onnx", model)  # what a `model.trained` event carries
    copied = dst.put("runs/r1/models/aws.onnx", fetch(announced.uri, announced.sha256))
    assert copied.sha256 == announced.sha256
    assert fetch(copied.uri, announced.sha256) == model
    with pytest.raises(IntegrityError):
        fetch(copied.uri, sha256_of(b"tampered"))


# ------------------------------------------------------------- cloud errors ---

@pytest.mark.emulators
@pytest.mark.parametrize("name", list(EMULATORS))
def test_a_missing_bucket_says_how_to_create_it(name, emulator_env):
    _require(name)
    scheme = EMULATORS[name][2].split("://")[0]
    store = open_store(f"{scheme}://skyfuse-no-such-bucket-{uuid.uuid4().hex[:8]}")
    with pytest.raises(StoreError, match="make emulators-up") as err:
        store.put("a.txt", b"x")
    assert not isinstance(err.value, NotFound)


def test_a_reader_racing_a_writer_sees_the_old_or_the_new_object_never_half(store):
    size = 9 * 1024 * 1024  # over one 8 MiB part: multipart / resumable / staged blocks
    versions = {bytes([v]) * size for v in b"ab"}
    store.put("models/current.onnx", b"a" * size)
    seen: set[bytes] = set()
    torn: list[str] = []
    done = threading.Event()

    def read_until_done() -> None:
        while not done.is_set():
            data = store.read("models/current.onnx")
            if data in versions:
                seen.add(data[:1])
            else:
                torn.append(f"{len(data)} bytes, first {data[:1]!r}, last {data[-1:]!r}")

    reader = threading.Thread(target=read_until_done)
    reader.start()
    try:
        for v in b"bab":
            store.put("models/current.onnx", bytes([v]) * size)
    finally:
        done.set()
        reader.join(60)
    assert not torn, f"torn reads: {torn}"
    assert seen and store.read("models/current.onnx") == b"b" * size


@pytest.mark.emulators
@pytest.mark.parametrize("name", list(EMULATORS))
def test_cloud_stores_delete_idempotently(name, new_store):
    store = new_store(name)
    store.put("runs/r1/a.csv", b"a")
    store.delete("runs/r1/a.csv")
    assert not store.exists("runs/r1/a.csv") and store.list("runs/") == []
    store.delete("runs/r1/a.csv")  # already gone: no error
