"""Fixtures the inference unit tests share: a tiny classifier and a slot serving it as v1."""
import pytest

from skyfuse.serving import testing
from skyfuse.serving.model import LoadedModel, ModelSlot


@pytest.fixture(scope="module")
def model_bytes():
    return testing.classifier(seed=1)


@pytest.fixture(scope="module")
def slot(model_bytes):
    slot = ModelSlot("file:///store/serving/current.json")
    slot.swap(LoadedModel(model_bytes, "v1"))
    return slot
