"""The function host under bus faults: nothing is lost, no partition stalls, no attempt is wasted.

A failing dead-letter publish, a listener that raises, a refused offset commit, a backlog that
arrives long after it was published, and a claim held by another instance."""
from datetime import UTC, datetime, timedelta

import pytest
import time_machine

from skyfuse import config
from skyfuse.runtime.function import Runtime
from tests.functions import probe_state
from tests.integration.test_host import PROVIDERS, Running, clean_probe, publish, shard_event  # noqa: F401


@pytest.fixture
def fleet(tmp_path):
    from tests.conftest import fleet_env

    return config.load(environ=fleet_env("embedded", tmp_path))


@pytest.fixture
def bus(fleet):
    from skyfuse.bus import open_bus

    bus = open_bus(fleet)
    yield bus
    bus.close()


class Flaky:
    """Wraps a bus (and its consumers) so chosen calls fail the first `n` times."""

    def __init__(self, bus, dlq_failures=0, commit_failures=0):
        self.bus, self.dlq_failures, self.commit_failures = bus, dlq_failures, commit_failures
        self.commits: list[dict] = []

    def __getattr__(self, name):
        return getattr(self.bus, name)

    def publish(self, topic, value, key=None, headers=None):
        if topic.endswith(".dlq") and self.dlq_failures:
            self.dlq_failures -= 1
            raise ConnectionError("bus unreachable while dead-lettering")
        return self.bus.publish(topic, value, key, headers)

    def consumer(self, group, topics, on_revoke=None):
        inner, outer = self.bus.consumer(group, topics, on_revoke=on_revoke), self

        class Consumer:
            def __getattr__(self, name):
                return getattr(inner, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                inner.close()

            def commit(self, offsets):
                if outer.commit_failures:
                    outer.commit_failures -= 1
                    raise ConnectionError("commit refused: coordinator moved")
                outer.commits.append(dict(offsets))
                inner.commit(offsets)

        return Consumer()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_failing_dead_letter_publish_keeps_the_record_and_other_lanes_go_on(bus, fleet, provider, uid):
    topic = f"faults-dlq-{uid}"
    bus.ensure_topics([topic], 1)
    publish(bus, topic, shard_event("poison", run_id="a"))  # keys (run ids) are lanes under ordering "key"
    for i in range(3):
        publish(bus, topic, shard_event(f"s{i}", run_id="b"))
    probe_state.FAILING["poison"] = -1
    flaky = Flaky(bus, dlq_failures=2)
    with Running(flaky, fleet, provider, topic, uid, ordering="key", max_attempts=1) as run:
        run.wait(lambda: len(run.results("ok")) == 3 and run.results("dead-lettered"))
        run.wait(lambda: bus.committed(f"{provider}.probe-{uid}", topic) == {0: 4})
    assert flaky.dlq_failures == 0 and len(bus.read(f"probe-{uid}.dlq")) == 1
    assert sorted({s for s, _ in probe_state.HANDLED}) == ["s0", "s1", "s2"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_listener_that_raises_does_not_stall_the_partition(bus, fleet, provider, uid):
    topic = f"faults-listener-{uid}"
    bus.ensure_topics([topic], 1)
    for i in range(3):
        publish(bus, topic, shard_event(f"s{i}"))
    with Running(bus, fleet, provider, topic, uid) as run:
        seen = run.deliveries

        def broken(delivery):
            seen.append(delivery)
            raise RuntimeError("the dashboard is down")

        run.host.listener = broken
        run.wait(lambda: bus.committed(f"{provider}.probe-{uid}", topic) == {0: 3})
    assert sorted(s for s, _ in probe_state.HANDLED) == ["s0", "s1", "s2"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_refused_commit_is_tried_again_without_a_restart(bus, fleet, provider, uid):
    topic = f"faults-commit-{uid}"
    bus.ensure_topics([topic], 1)
    for i in range(3):
        publish(bus, topic, shard_event(f"s{i}"))
    flaky = Flaky(bus, commit_failures=2)
    with Running(flaky, fleet, provider, topic, uid) as run:
        run.wait(lambda: bus.committed(f"{provider}.probe-{uid}", topic) == {0: 3})
    assert flaky.commit_failures == 0 and flaky.commits[-1] and list(flaky.commits[-1].values()) == [3]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_backlog_record_gets_its_retries_however_old_it_is(bus, fleet, provider, uid):
    fleet = config.replace(fleet, delivery=config.replace(fleet.delivery, max_record_age_s=60))
    topic = f"faults-backlog-{uid}"
    bus.ensure_topics([topic], 1)
    with time_machine.travel(datetime.now(UTC) - timedelta(hours=2)):  # published before the outage
        publish(bus, topic, shard_event("old"))
    probe_state.FAILING["old"] = 1  # one transient failure
    with Running(bus, fleet, provider, topic, uid) as run:
        run.wait(lambda: run.results("ok"))
    assert not run.results("dead-lettered") and len(run.results("retry")) >= 1


def test_a_claim_held_by_another_instance_costs_no_attempt(bus, fleet, uid, monkeypatch):
    """The probe raises InProgress (as `runtime.once` does) for longer than max_attempts allows:
    the host waits for the claim, and handles the record once it is free."""
    from skyfuse.runtime.clouds import aws
    from skyfuse.runtime.idempotency import InProgress

    topic = f"faults-claim-{uid}"
    bus.ensure_topics([topic], 1)
    publish(bus, topic, shard_event("busy"))
    left = {"n": 4}
    real = aws.run_handler

    def held_elsewhere(handle, event, runtime: Runtime):
        def core(ev, rt):
            if left["n"]:
                left["n"] -= 1
                raise InProgress("train/r1 is being handled by host-1; its claim expires in 0 s", retry_after_s=0.01)
            handle(ev, rt)
        return real(core, event, runtime)

    monkeypatch.setattr(aws, "run_handler", held_elsewhere)
    with Running(bus, fleet, "aws", topic, uid, max_attempts=2) as run:
        run.wait(lambda: run.results("ok"))
    assert left["n"] == 0 and not run.results("dead-lettered") and probe_state.HANDLED == [("busy", "aws")]
