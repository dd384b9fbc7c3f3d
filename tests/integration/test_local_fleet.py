"""`skyfuse up --function F` runs F alone: its hosts, and its timers only."""
from skyfuse import config
from skyfuse.bus import open_bus
from skyfuse.local import LocalFleet
from tests.conftest import fleet_env


def threads(tmp_path, functions):
    fleet = config.load(environ=fleet_env("embedded", tmp_path))
    bus = open_bus(fleet)
    running = LocalFleet(fleet, bus, functions=functions, serve=False).start()
    try:
        return sorted(t.name for t in running.fabric.threads)
    finally:
        running.stop()
        bus.close()


def test_one_function_starts_no_other_functions_timers(tmp_path):
    assert threads(tmp_path / "a", ["trainer"]) == ["aws.trainer", "azure.trainer", "gcp.trainer"]


def test_the_fuser_alone_keeps_its_quorum_timer_and_everything_starts_every_timer(tmp_path):
    assert threads(tmp_path / "b", ["fuser"]) == ["aws.fuser", "aws.fuser.timer", "azure.fuser", "azure.fuser.timer",
                                                  "gcp.fuser", "gcp.fuser.timer"]
    everything = threads(tmp_path / "c", None)
    assert {"aws.monitor.timer", "aws.fuser.timer"} <= set(everything)
