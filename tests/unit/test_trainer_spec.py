"""services/trainer: the ModelSpec a shard's `model` dict and the fleet's training settings make,
for the first training and for the fine-tuning rounds of each server strategy."""
import pytest

from services.trainer.handler import model_spec
from skyfuse.config import Training
from skyfuse.runtime.function import Rejected

FLEET = Training(hidden=[16], epochs=40, learning_rate=0.005, proximal_mu=0.05, finetune_learning_rate=0.2,
                 finetune_lr_decay=0.5)


def test_the_shard_model_dict_wins_and_the_fleet_fills_in():
    spec = model_spec({"hidden": [8, 4], "seed": 3, "optimizer": "sgd", "init": "normal", "early_stopping": False,
                       "batch_size": 5000, "standardization": {"mean": [0.0], "variance": [1.0]}}, FLEET, "wavg")
    assert (spec.hidden, spec.epochs, spec.learning_rate, spec.seed) == ((8, 4), 40, 0.005, 3)
    assert (spec.optimizer, spec.init, spec.early_stopping, spec.batch_size) == ("sgd", "normal", False, 5000)
    assert spec.proximal_mu == 0.0


@pytest.mark.parametrize("fusion,mu", [("fedprox", 0.05), ("fedavg", 0.0), ("auto", 0.0), ("fedadam", 0.0)])
def test_fine_tuning_rounds_train_as_the_fleet_says_with_the_proximal_term_only_under_fedprox(fusion, mu):
    first = model_spec({}, FLEET, fusion, 0)
    assert (first.optimizer, first.learning_rate, first.early_stopping, first.proximal_mu) == ("adam", 0.005, True, 0.0)
    second, third = model_spec({}, FLEET, fusion, 1), model_spec({}, FLEET, fusion, 3)
    assert (second.optimizer, second.learning_rate, second.early_stopping) == ("sgd", 0.2, False)
    assert third.learning_rate == pytest.approx(0.2 * 0.5 ** 2)
    assert second.proximal_mu == third.proximal_mu == mu
    assert model_spec({"proximal_mu": 0.3}, FLEET, fusion, 1).proximal_mu == 0.3  # the run's own mu wins


def test_a_value_the_spec_refuses_is_a_rejected_shard_with_the_reason():
    with pytest.raises(Rejected, match="model settings cannot be used: optimizer 'rmsprop' is not one of adam, sgd"):
        model_spec({"optimizer": "rmsprop"}, FLEET, "auto")
