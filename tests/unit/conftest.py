"""Fixtures the inference unit tests share: a tiny classifier, a slot serving it as v1, and this
process's inference core serving it from a temporary store."""
import contextlib

import pytest

from skyfuse.serving import testing
from skyfuse.serving.model import LoadedModel, ModelSlot, publish


@pytest.fixture(scope="module")
def model_bytes():
    return testing.classifier(seed=1)


@pytest.fixture(scope="module")
def slot(model_bytes):
    slot = ModelSlot("file:///store/serving/current.json")
    slot.swap(LoadedModel(model_bytes, "v1"))
    return slot


@contextlib.contextmanager
def inference_core(tmp_path, model_bytes):
    """`services.inference.handler`'s service of this process, serving `model_bytes` as v1 from a
    store under tmp_path (the INFERENCE_* settings as the test set them before)."""
    from services.inference import handler
    from skyfuse import config
    from skyfuse.runtime.function import Runtime, hosted
    from skyfuse.storage import open_store

    store_uri = f"file://{tmp_path}/store"
    fleet = config.load(environ={"SKYFUSE_BUS__EMBEDDED__PATH": str(tmp_path / "bus"),
                                 "SKYFUSE_CLOUDS__AWS__STORE": store_uri})
    publish(open_store(store_uri), "v1", model_bytes)
    handler.reset()
    with hosted(Runtime("aws", "inference", fleet)):
        handler.service()
    try:
        yield handler.service()
    finally:
        handler.reset()
