"""Encrypted Kafka: the bus over the local broker's SASL_SSL listener (`kafka.sh up` opens it on
127.0.0.1:9094: TLS with the CA in .skyfuse/kafka-tls, SCRAM-SHA-256/512 logins, OAUTHBEARER with
unsigned tokens), the ways a connection is refused, and the config errors. Another broker's listener
and TLS folder: SKYFUSE_TEST_KAFKA_SASL_SSL=host:port and SKYFUSE_TEST_KAFKA_TLS_DIR, else kafka.sh's own
knobs KAFKA_SASL_SSL_PORT and KAFKA_TLS_DIR."""
import base64
import inspect
import json
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from kafka.net.sasl.oauth import AbstractTokenProvider

from skyfuse import config
from skyfuse.bus import TopicPartition, open_bus
from skyfuse.bus.kafka import KafkaUnavailable
from skyfuse.redact import MARK, redact
from skyfuse.runtime.function import JsonFormatter
from tests.conftest import fleet_env
from tests.integration import test_bus_contract as contract

SASL_SSL = os.environ.get("SKYFUSE_TEST_KAFKA_SASL_SSL", f"127.0.0.1:{os.environ.get('KAFKA_SASL_SSL_PORT', '9094')}")
TLS_DIR = Path(os.environ.get("SKYFUSE_TEST_KAFKA_TLS_DIR") or os.environ.get("KAFKA_TLS_DIR")
               or Path(__file__).resolve().parents[2] / ".skyfuse" / "kafka-tls")
kafka = pytest.mark.kafka


@dataclass(frozen=True)
class Listener:
    bootstrap: str
    cafile: str
    user: str
    password: str


@pytest.fixture(scope="session")
def listener() -> Listener:
    files = [TLS_DIR / f for f in ("ca.pem", "scram-user", "scram-password")]
    if not all(f.is_file() for f in files):
        pytest.fail(f"no TLS files in {TLS_DIR}: `make kafka-up` makes them and starts the broker (`make test` does), "
                    "or point SKYFUSE_TEST_KAFKA_TLS_DIR at another broker's KAFKA_TLS_DIR", pytrace=False)
    host, port = SASL_SSL.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        pytest.fail(f"no SASL_SSL listener at {SASL_SSL}: start the broker with `make kafka-up` (one started by an "
                    "older kafka.sh has none: `make kafka-down kafka-up`), or point SKYFUSE_TEST_KAFKA_SASL_SSL at one",
                    pytrace=False)
    user, password = (f.read_text().strip() for f in files[1:])
    return Listener(SASL_SSL, str(TLS_DIR / "ca.pem"), user, password)


def secure_env(listener: Listener, tmp_path, mechanism: str = "SCRAM-SHA-512", **extra) -> dict:
    """A fleet on the SASL_SSL listener, the password from the environment as in production."""
    if mechanism == "OAUTHBEARER":
        login = {"SKYFUSE_BUS__KAFKA__SASL_OAUTH_TOKEN_PROVIDER": f"{__name__}:UnsignedJwt"}
    else:
        login = {"SKYFUSE_BUS__KAFKA__SASL_USERNAME": listener.user,
                 "SKYFUSE_BUS__KAFKA__SASL_PASSWORD": listener.password}
    return fleet_env("kafka", tmp_path, **{
        "SKYFUSE_BUS__KAFKA__BOOTSTRAP_SERVERS": listener.bootstrap,
        "SKYFUSE_BUS__KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "SKYFUSE_BUS__KAFKA__SSL_CAFILE": listener.cafile, "SKYFUSE_BUS__KAFKA__SASL_MECHANISM": mechanism,
        **login, **extra})


def refused(env: dict) -> str:
    """The error of a bus that cannot connect: quick, since request_timeout_ms also bounds the bootstrap."""
    bus = open_bus(config.load(environ={**env, "SKYFUSE_BUS__KAFKA__REQUEST_TIMEOUT_MS": "2000"}))
    try:
        with pytest.raises(KafkaUnavailable) as caught:
            bus.publish("never", b"x")
        return str(caught.value)
    finally:
        bus.close()


class UnsignedJwt(AbstractTokenProvider):
    """What an MSK IAM provider does (a token per call), with an unsigned JWT the local broker's development
    validator accepts."""
    calls = 0

    def token(self) -> str:
        UnsignedJwt.calls += 1
        now = int(time.time())
        part = lambda doc: base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()  # noqa: E731
        return f"{part({'alg': 'none'})}.{part({'sub': 'skyfuse', 'iat': now, 'exp': now + 3600})}."


@kafka
@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_scram_over_tls_publishes_consumes_and_commits(listener, tmp_path, uid, mechanism, caplog, monkeypatch):
    monkeypatch.setenv("SKYFUSE_BUS__KAFKA__SASL_PASSWORD", listener.password)
    caplog.set_level(logging.DEBUG)  # kafka-python's most verbose: requests, SASL exchanges, configs
    caplog.set_level(logging.DEBUG, logger="kafka")  # whatever an earlier test (the CLI's callback) set it to
    topic, group = f"secure-{uid}", f"g-{uid}"
    bus = open_bus(config.load(environ=secure_env(listener, tmp_path, mechanism)))
    try:
        bus.ensure_topics([topic], 2)
        for i in range(12):
            bus.publish(topic, str(i).encode(), str(i).encode())
        with bus.consumer(group, [topic]) as consumer:
            got = contract.drain(consumer, 12)
            assert sorted(int(r.value) for r in got) == list(range(12))
            done = {}
            for r in got:
                done[r.partition] = max(done.get(r.partition, 0), r.offset + 1)
            consumer.commit({TopicPartition(topic, p): o for p, o in done.items()})
        assert bus.committed(group, topic) == done
        assert bus.lag(group, topic) == 0
    finally:
        bus.close()
    assert any("Authenticated" in r.getMessage() for r in caplog.records)  # the login did happen
    assert listener.password not in caplog.text


CONTRACT = [f for name, f in vars(contract).items()
            if name.startswith("test_") and list(inspect.signature(f).parameters) == ["bus", "uid"]]


@kafka
@pytest.mark.parametrize("check", CONTRACT, ids=[f.__name__ for f in CONTRACT])
def test_the_bus_contract_holds_over_sasl_ssl(listener, tmp_path, uid, check):
    bus = open_bus(config.load(environ=secure_env(listener, tmp_path)))
    try:
        check(bus, uid)
    finally:
        bus.close()


@kafka
def test_oauthbearer_uses_the_configured_token_provider(listener, tmp_path, uid):
    calls = UnsignedJwt.calls
    bus = open_bus(config.load(environ=secure_env(listener, tmp_path, "OAUTHBEARER")))
    try:
        bus.publish(f"oauth-{uid}", b"v", b"k")
        assert [r.value for r in bus.read(f"oauth-{uid}")] == [b"v"]
    finally:
        bus.close()
    assert UnsignedJwt.calls > calls


@kafka
def test_a_wrong_password_is_refused_and_never_shown(listener, tmp_path, caplog, monkeypatch):
    wrong = "not-the-" + listener.password
    monkeypatch.setenv("SKYFUSE_BUS__KAFKA__SASL_PASSWORD", wrong)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="kafka")
    error = refused(secure_env(listener, tmp_path, SKYFUSE_BUS__KAFKA__SASL_PASSWORD=wrong))
    assert "refused the SCRAM-SHA-512 login" in error and f"user {listener.user!r}" in error
    assert "SKYFUSE_BUS__KAFKA__SASL_PASSWORD" in error
    for text in (error, caplog.text):
        assert wrong not in text and listener.password not in text
    # and were it written anywhere, redact (so every skyfuse log line) would hide it: a secret-looking name
    assert redact(f"login with {wrong} failed") == f"login with {MARK} failed"
    line = JsonFormatter().format(logging.makeLogRecord({"msg": "password was %s", "args": (wrong,)}))
    assert wrong not in line and MARK in line


@kafka
def test_a_client_that_does_not_trust_the_ca_is_refused(listener, tmp_path):
    error = refused(secure_env(listener, tmp_path, SKYFUSE_BUS__KAFKA__SSL_CAFILE=""))  # the system's CAs only
    assert "certificate" in error and "not trusted" in error and "bus.kafka.ssl_cafile" in error


@kafka
def test_a_plaintext_client_gets_nothing_from_the_tls_port(listener, tmp_path):
    error = refused(fleet_env("kafka", tmp_path, SKYFUSE_BUS__KAFKA__BOOTSTRAP_SERVERS=listener.bootstrap))
    assert "does not answer as a PLAINTEXT Kafka listener" in error and "bus.kafka.security_protocol" in error
    # Below the client: a Kafka ApiVersions request in clear text gets no Kafka answer, at most a TLS alert.
    host, port = listener.bootstrap.rsplit(":", 1)
    client_id = b"probe"
    body = struct.pack(">hhih", 18, 0, 7, len(client_id)) + client_id  # ApiVersions v0, correlation id 7
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        answer = b""
        while chunk := sock.recv(4096):  # until the broker closes the connection
            answer += chunk
    assert answer == b"" or answer[0] == 0x15, answer[:16]  # 0x15: a TLS alert record
    assert struct.pack(">i", 7) not in answer[4:8]


def config_error(**env) -> str:
    with pytest.raises(config.ConfigError) as caught:
        config.load(environ={f"SKYFUSE_BUS__KAFKA__{k.upper()}": v for k, v in env.items()})
    return str(caught.value)


def test_config_errors_name_the_key_and_the_fix(tmp_path):
    assert "needs sasl_mechanism: set it to SCRAM-SHA-512" in config_error(security_protocol="SASL_SSL")
    scram = config_error(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-256")
    assert "needs sasl_username" in scram and "SKYFUSE_BUS__KAFKA__SASL_PASSWORD" in scram
    assert "needs sasl_oauth_token_provider" in config_error(security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER")
    missing = str(tmp_path / "ca.pem")
    assert f"ssl_cafile {missing!r}: no such file" in config_error(security_protocol="SSL", ssl_cafile=missing)
    assert "needs security_protocol SASL_SSL" in config_error(sasl_mechanism="PLAIN", sasl_username="u",
                                                              sasl_password="pw-123456")
    cafile = tmp_path / "ca.pem"
    cafile.write_text("")
    assert "has no TLS" in config_error(ssl_cafile=str(cafile))  # TLS meant, clear text configured
    assert "not \"package.module:callable\"" in config_error(
        security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER", sasl_oauth_token_provider="no colon")
    # TOML reads an all-digit password as a number; the error says so without showing it
    digits = config_error(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u",
                          sasl_password="31415926535")
    assert "sasl_password: must be a string" in digits and "31415926535" not in digits


def test_a_token_provider_that_is_not_one_is_named(tmp_path):
    env = {"SKYFUSE_BUS__BACKEND": "kafka", "SKYFUSE_BUS__KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
           "SKYFUSE_BUS__KAFKA__SASL_MECHANISM": "OAUTHBEARER"}
    for provider, says in (("os:getcwd", "gave a str"), ("no_such_module_here:make", "cannot load")):
        with pytest.raises(config.ConfigError, match=f"bus.kafka.sasl_oauth_token_provider: .*{says}"):
            open_bus(config.load(environ={**env, "SKYFUSE_BUS__KAFKA__SASL_OAUTH_TOKEN_PROVIDER": provider}))
