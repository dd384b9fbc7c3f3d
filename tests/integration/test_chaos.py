"""The short chaos run of `make test` (`make chaos` runs 30 shards with a broker restart): six
shards on the real broker, two host processes per function group, one of them SIGKILLed
mid-run; the ledger finds every effect exactly once and the fused model served."""
import pytest

from tests.chaos.chaos import run

pytestmark = pytest.mark.kafka


def test_a_host_killed_mid_run_loses_and_doubles_nothing(kafka_bootstrap, tmp_path):
    result = run(shards=6, every=(3.0, 6.0), kills=1, broker_restart=False, seed=7, deadline_s=300,
                 bootstrap=kafka_bootstrap, workdir=tmp_path, log=lambda line: None)
    assert result["kills"] == 1
    assert (result["missing"], result["duplicated"], result["unexpected"]) == ([], [], [])
    assert result["fused"] and result["served"], result
