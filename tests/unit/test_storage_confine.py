"""URIs from events name only objects inside the fleet's own stores, and reading one never
creates anything."""
import pytest

from skyfuse import config, contracts
from skyfuse.runtime.function import Runtime
from skyfuse.storage import StoreError
from skyfuse.storage.confine import OutsideFleet, locate, store_root

ROOTS = {"aws": "s3://skyfuse-aws", "gcp": "gs://skyfuse-gcp", "azure": "file:///srv/stores/azure"}


def test_objects_inside_a_configured_store_are_located():
    assert locate("s3://skyfuse-aws/runs/r1/shards/0.csv", ROOTS) == ("aws", "s3://skyfuse-aws", "runs/r1/shards/0.csv")
    assert locate("file:///srv/stores/azure/serving/models/v-1.onnx", ROOTS)[0] == "azure"


@pytest.mark.parametrize("uri, words", [
    ("file:///etc/hostname", "outside the fleet's stores"),
    ("s3://someone-else/runs/r1/model.onnx", "outside the fleet's stores"),
    ("s3://skyfuse-aws-evil/runs/x", "outside the fleet's stores"),  # a bucket that only starts the same
    ("file:///srv/stores/azure/../../etc/passwd", "segment '..'"),
    ("file:///srv/stores/azure/runs/./x", "segment '.'"),
    ("gs://skyfuse-gcp/runs//x", "segment ''"),
    ("gs://skyfuse-gcp/runs/%2e%2e/x", "segment '%2e%2e'"),
    ("file:///srv/stores", "outside the fleet's stores"),
])
def test_anything_else_is_refused_with_the_reason(uri, words):
    with pytest.raises(OutsideFleet, match=words.replace("(", r"\(").replace(".", r"\.")):
        locate(uri, ROOTS)


def test_a_runtime_fetch_needs_a_digest_and_never_creates_folders(tmp_path):
    fleet = config.load(environ={f"SKYFUSE_CLOUDS__{c.upper()}__STORE": f"file://{tmp_path}/stores/{c}"
                                 for c in ("aws", "gcp", "azure")})
    runtime = Runtime("aws", "deployer", fleet)
    missing = f"{store_root(fleet.clouds['aws'].store)}/runs/r1/nothing/here.onnx"
    with pytest.raises(StoreError, match="no object"):
        runtime.fetch(missing, "0" * 64)
    assert not (tmp_path / "stores").exists()
    with pytest.raises(StoreError, match="no sha256 came with it"):
        runtime.fetch(missing, None)


@pytest.mark.parametrize("bad", [".", ".."])
def test_ids_may_not_be_dot_or_dot_dot(bad):
    with pytest.raises(contracts.ContractError, match="does not match"):
        contracts.validate("shard.ready", {**contracts.sample("shard.ready"), "run_id": bad})
