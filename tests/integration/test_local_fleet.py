"""`skyfuse up --function F` runs F alone: its hosts, and its timers only."""
import os

import pytest

from skyfuse import config
from skyfuse.bus import open_bus
from skyfuse.dev import local
from skyfuse.dev.local import LocalFleet
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


def test_a_part_that_cannot_start_stops_what_had_started(tmp_path, monkeypatch):
    """The servers are up when the router finds its port taken: none is left running."""
    import socket

    import pytest

    from skyfuse.dev.hosts import free_port

    monkeypatch.chdir(tmp_path)
    ports = {c: free_port() for c in ("aws", "gcp", "azure")}
    fleet = config.load(environ=fleet_env("embedded", tmp_path, **{
        f"SKYFUSE_CLOUDS__{c.upper()}__INFERENCE_PORT": p for c, p in ports.items()}))
    bus = open_bus(fleet)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError, match=r"router cannot listen on 127\.0\.0\.1:\d+ .*--router-port"):
            LocalFleet(fleet, bus, functions=["trainer"], router_port=taken.getsockname()[1]).start()
    finally:
        taken.close()
        bus.close()
    for port in ports.values():  # every server it had started was stopped
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert not (tmp_path / ".skyfuse" / "endpoints.json").exists()


def test_endpoints_json_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """Other commands read it at any moment (`running`): a write that fails part-way leaves the last
    whole file, never a truncated one."""
    monkeypatch.chdir(tmp_path)
    local._write_endpoints({"pid": os.getpid(), "clouds": {"aws": "http://127.0.0.1:1"}})
    assert local.running() == {"aws": "http://127.0.0.1:1"}
    def disk_full(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="disk full"):
        local.record_gateway("aws", "http://127.0.0.1:2")
    assert local.running() == {"aws": "http://127.0.0.1:1"}
    assert [p.name for p in (tmp_path / ".skyfuse").iterdir()] == ["endpoints.json"]  # nothing staged left


def test_a_taken_inference_port_fails_the_start_naming_the_key(tmp_path, monkeypatch):
    """Another program on the port: its answers to GET /health must not pass for this fleet's server."""
    import socket

    from skyfuse.dev import hosts

    monkeypatch.chdir(tmp_path)
    ports = {c: hosts.free_port() for c in ("aws", "gcp", "azure")}
    fleet = config.load(environ=fleet_env("embedded", tmp_path, **{
        f"SKYFUSE_CLOUDS__{c.upper()}__INFERENCE_PORT": p for c, p in ports.items()}))
    bus = open_bus(fleet)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["gcp"]))
        taken.listen()
        with pytest.raises(hosts.PortInUse, match=rf"127\.0\.0\.1:{ports['gcp']}.*clouds\.gcp\.inference_port"):
            LocalFleet(fleet, bus, functions=["trainer"], router_port=0).start()
    bus.close()
    for cloud in ("aws", "azure"):  # started, then stopped with the rest
        assert not hosts.listened_on(ports[cloud])


def test_one_serving_fleet_per_folder(tmp_path, monkeypatch):
    """A second `skyfuse up` in the folder gives up before its servers start (the folder's lock holds
    even when both start at once), and leaves the first fleet's endpoints.json alone."""
    from skyfuse.dev import hosts

    monkeypatch.chdir(tmp_path)
    fleet = config.load(environ=fleet_env("embedded", tmp_path, SKYFUSE_CLOUDS__AWS__INFERENCE_PORT=hosts.free_port()))
    bus = open_bus(fleet)
    first = LocalFleet(fleet, bus, functions=["trainer"], clouds=["aws"], router_port=0).start()
    try:
        serving = local.running()
        assert serving is not None and set(serving) == {"aws"}
        with pytest.raises(hosts.HostError, match="a fleet is already up in this folder"):
            LocalFleet(fleet, bus, functions=["trainer"], clouds=["aws"], router_port=0).start()
        assert local.running() == serving
    finally:
        first.stop()
    assert local.running() is None
    again = LocalFleet(fleet, bus, functions=["trainer"], clouds=["aws"], router_port=0).start()  # the folder is free
    again.stop()
    bus.close()
