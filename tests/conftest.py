"""Shared fixtures. Tests marked `kafka` need the broker `make kafka-up` starts; without it they
fail with the command to run, never skip."""
import os
import socket
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import time_machine

from skyfuse import config

KAFKA = os.environ.get("SKYFUSE_TEST_KAFKA", "127.0.0.1:9092")
BACKENDS = [pytest.param("embedded"), pytest.param("kafka", marks=pytest.mark.kafka)]


def kafka_reachable() -> bool:
    host, port = KAFKA.split(",")[0].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    if not kafka_reachable():
        pytest.fail(f"no Kafka broker at {KAFKA}: start it with `make kafka-up` (`make test` does), "
                    "or point SKYFUSE_TEST_KAFKA at one", pytrace=False)
    return KAFKA


def pytest_addoption(parser):
    parser.addoption("--clock-shift-days", type=float, default=0.0, metavar="DAYS",
                     help="run with this process's wall clock moved DAYS days (time-machine, ticking): "
                          "no decision may depend on the date (`make test` runs the time-sensitive tests a year ahead)")


@pytest.fixture(scope="session", autouse=True)
def shifted_wall_clock(request):
    days = request.config.getoption("--clock-shift-days")
    if not days:
        yield None
        return
    target = datetime.now(UTC) + timedelta(days=days)
    with time_machine.travel(target, tick=True):
        assert abs((datetime.now(UTC) - target).total_seconds()) < 60
        yield target


@pytest.fixture(scope="session", autouse=True)
def local_keys():
    """The signing keys of the default fleet under ./.skyfuse/keys, as `make test` runs with signing
    on (tests with other clouds make theirs with `signing.ensure_local_keys`)."""
    from skyfuse import signing

    signing.ensure_local_keys(config.Fleet())


def keyed_fleet(root):
    """The default fleet with its bus and its own signing keys (made here) under `root`."""
    from skyfuse import signing

    fleet = config.load(environ={"SKYFUSE_SIGNING__KEYS_DIR": str(root / "keys"),
                                 "SKYFUSE_BUS__EMBEDDED__PATH": str(root / "bus")})
    signing.ensure_local_keys(fleet)
    return fleet


def signed_event(type_name: str, data: dict, by: str, fleet=None, time: str | None = None, event_id: str | None = None):
    """An event of `type_name` emitted by principal `by` (`aws/scheduler`, `cli`), signed with its
    key in the fleet's keys folder (made there if missing), as that producer would publish it;
    `time`: the event's own time attribute."""
    from skyfuse import events, signing

    fleet = fleet or config.Fleet()
    event = events.new_event(type_name, data, source=signing.source_of(by), subject=data.get("cloud"),
                             event_id=event_id)
    if time is not None:
        event["time"] = time
    signing.init_keys(fleet.signing.keys_dir, [by])
    return signing.load_signer(fleet.signing.keys_dir, by).sign(event)


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:10]


def fleet_env(backend: str, tmp_path, **extra) -> dict:
    env = {"SKYFUSE_BUS__BACKEND": backend, "SKYFUSE_BUS__EMBEDDED__PATH": str(tmp_path / "bus"),
           "SKYFUSE_BUS__KAFKA__BOOTSTRAP_SERVERS": KAFKA, "SKYFUSE_BUS__KAFKA__SESSION_TIMEOUT_MS": "6000",
           "SKYFUSE_DELIVERY__BACKOFF_INITIAL_S": "0.01", "SKYFUSE_DELIVERY__BACKOFF_MAX_S": "0.05"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    if request.param == "kafka":
        request.getfixturevalue("kafka_bootstrap")
    return request.param


@pytest.fixture
def fleet(backend, tmp_path):
    return config.load(environ=fleet_env(backend, tmp_path))


@pytest.fixture
def bus(fleet):
    from skyfuse.bus import open_bus

    bus = open_bus(fleet)
    yield bus
    bus.close()
