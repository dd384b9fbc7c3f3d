"""A function host killed with SIGKILL in the middle of a batch, then restarted: every event is
handled, none lost (some are handled twice: delivery is at-least-once)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from skyfuse import contracts, events
from tests.conftest import fleet_env, signed_event

REPO = Path(__file__).resolve().parents[2]
COUNT = 150


def start(provider, topic, function, env):
    return subprocess.Popen([sys.executable, "-m", "tests.functions.run_host", provider, topic, function],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def handled(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("provider", ["aws", "azure"])
def test_sigkill_mid_batch_then_restart_loses_nothing(backend, bus, tmp_path, uid, provider):
    topic, function = f"crash-{uid}", f"probe-{uid}"
    bus.ensure_topics([topic], 3)
    ids = []
    for i in range(COUNT):
        event = signed_event("shard.ready", {**contracts.sample("shard.ready"), "shard_id": f"s{i}",
                                             "run_id": f"run{i % 9}"}, "cli")
        key, value, headers = events.encode(event)
        bus.publish(topic, value, key, headers)
        ids.append(event["id"])
    out = tmp_path / "handled.txt"
    env = {**os.environ, **fleet_env(backend, tmp_path), "PROBE_OUT": str(out), "PROBE_SLEEP_S": "0.01"}

    first = start(provider, topic, function, env)
    try:
        wait_for(lambda: len(handled(out)) >= COUNT // 3, 60, "the first host to handle a third of the events")
        first.send_signal(signal.SIGKILL)  # mid-batch: batches are 64-100 records, a record takes 10 ms
        first.wait(10)
    finally:
        first.kill()
    before = len(handled(out))
    assert before < COUNT, "the host finished before it could be killed; the test proves nothing"

    second = start(provider, topic, function, env)
    try:
        wait_for(lambda: set(ids) <= set(handled(out)), 90, "the restarted host to handle every event")
    finally:
        second.kill()
        second.wait(10)
    seen = handled(out)
    assert set(seen) == set(ids)  # every event handled, none invented
    print(f"\n{provider}/{backend}: killed after {before} of {COUNT}; {len(seen) - COUNT} handled twice")
