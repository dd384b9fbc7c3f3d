"""What a runtime remembers is bounded by one setting, `Runtime.keep` (default `function.KEEP`):
the events it emitted, the ids it handled, the events it rejected, the claims held elsewhere."""
import pytest

from skyfuse import config, contracts, events
from skyfuse.runtime import function
from skyfuse.runtime.function import Rejected, Runtime, hosted, run_handler
from skyfuse.runtime.idempotency import InProgress


@pytest.fixture
def fleet(tmp_path):
    return config.load(environ={"SKYFUSE_BUS__EMBEDDED__PATH": str(tmp_path / "bus"),
                                "SKYFUSE_SIGNING__ENABLED": "false"})


def placement():
    return events.new_event("placement.changed", contracts.sample("placement.changed"), source="skyfuse://aws/scheduler")


def test_the_default_is_the_module_cap(fleet):
    assert Runtime("aws", "deployer", fleet).keep == function.KEEP == 1000


def test_emitted_and_handled_keep_the_latest(fleet):
    runtime = Runtime("aws", "scheduler", fleet, keep=3)
    sent = [runtime.emit("placement.changed", contracts.sample("placement.changed")) for _ in range(5)]
    assert [e["id"] for e in runtime.emitted] == [e["id"] for e in sent[-3:]]
    received = [placement() for _ in range(5)]
    for event in received:
        runtime.received(event)
    assert runtime.handled == [e["id"] for e in received[-3:]]
    runtime.bus.close()


def test_rejected_and_claimed_elsewhere_stay_within_the_cap(fleet):
    runtime = Runtime("aws", "deployer", fleet, keep=2)

    def refuse(event, rt):
        raise Rejected("never")

    def claimed(event, rt):
        raise InProgress("held elsewhere", retry_after_s=4.0)

    with hosted(runtime):
        for _ in range(5):
            run_handler(refuse, placement(), runtime)
            assert 1 <= len(runtime.rejected) <= 2
            with pytest.raises(InProgress):
                run_handler(claimed, placement(), runtime)
            assert 1 <= len(runtime.claimed_elsewhere) <= 2
    runtime.bus.close()
