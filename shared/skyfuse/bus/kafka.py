"""The Kafka bus: Apache Kafka through kafka-python.

Producer with acks=all (a publish returns once the record is durably in the log); consumers with
auto-commit off, committing only what the host says is done; session timeout at least 6 s, the
broker's minimum. TLS and SASL settings (`security_options`) go to every client alike.
"""
from __future__ import annotations

import importlib
import socket
import ssl
import threading
from collections.abc import Callable, Collection, Iterable
from typing import Any, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaTimeoutError, TopicAlreadyExistsError
from kafka.net.sasl.oauth import AbstractTokenProvider
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as KafkaTP

from skyfuse import config
from skyfuse.bus.base import Bus, Consumer, Headers, Record, RevokeListener, TopicPartition
from skyfuse.errors import Failure
from skyfuse.redact import MARK, redact

Client = TypeVar("Client")


class KafkaUnavailable(Failure, ConnectionError):
    """No client could connect to the brokers; the message says which step failed and which key to check."""


def security_options(settings: config.KafkaBus) -> dict[str, Any]:
    """kafka-python's keyword arguments for the TLS and SASL settings of `settings` (the same for the
    producer, consumers and admin client)."""
    options: dict[str, Any] = {"security_protocol": settings.security_protocol}
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        options.update(ssl_cafile=settings.ssl_cafile or None, ssl_certfile=settings.ssl_certfile or None,
                       ssl_keyfile=settings.ssl_keyfile or None, ssl_check_hostname=settings.ssl_check_hostname)
    if settings.sasl_mechanism == "OAUTHBEARER":
        options.update(sasl_mechanism="OAUTHBEARER",
                       sasl_oauth_token_provider=token_provider(settings.sasl_oauth_token_provider))
    elif settings.sasl_mechanism:
        options.update(sasl_mechanism=settings.sasl_mechanism, sasl_plain_username=settings.sasl_username,
                       sasl_plain_password=_Password(settings.sasl_password))
    return options


class _Password(str):
    """The password as kafka-python needs it (a str), shown as <redacted> wherever a config dict is
    printed: KafkaAdminClient logs its whole configuration at DEBUG."""

    def __repr__(self) -> str:
        return repr(MARK)


def token_provider(spec: str) -> AbstractTokenProvider:
    """The AbstractTokenProvider named by `package.module:callable`: the object itself if it is one, else what
    calling it returns. Checked here: kafka-python would only fail at connect time, as a bootstrap timeout."""
    key = "bus.kafka.sasl_oauth_token_provider"
    module, _, attr = spec.partition(":")
    try:
        target: Any = importlib.import_module(module)  # then whatever the attributes hold
        for part in attr.split("."):
            target = getattr(target, part)
        provider = target if isinstance(target, AbstractTokenProvider) else target()
    except Exception as exc:  # noqa: BLE001 - whatever the user's code raises, say which key it came from
        raise config.ConfigError(redact(f"{key}: cannot load {spec!r} ({type(exc).__name__}: {exc}); it must be "
                                        "`package.module:callable`, importable here")) from None
    if not isinstance(provider, AbstractTokenProvider):
        raise config.ConfigError(f"{key}: {spec!r} gave a {type(provider).__name__}, not a kafka-python "
                                 "kafka.net.sasl.oauth.AbstractTokenProvider: subclass it and implement token()")
    return provider


class KafkaBus(Bus):
    backend = "kafka"

    def __init__(self, bootstrap_servers: str, *, client_id: str = "skyfuse", session_timeout_ms: int = 10_000,
                 request_timeout_ms: int = 30_000, default_partitions: int = 3, security: dict[str, Any] | None = None):
        self.bootstrap = bootstrap_servers
        self.security = dict(security or {"security_protocol": "PLAINTEXT"})  # from `security_options`
        self.client_id = client_id
        self.session_timeout_ms = session_timeout_ms
        self.request_timeout_ms = request_timeout_ms
        self.default_partitions = default_partitions
        self._producer: KafkaProducer | None = None
        self._admin: KafkaAdminClient | None = None
        self._lock = threading.Lock()
        self._admin_lock = threading.RLock()  # KafkaAdminClient is not safe to share between threads

    def connect(self, client_class: Callable[..., Client], **options: Any) -> Client:
        """A kafka-python client with this bus's brokers, timeouts, TLS and SASL settings: the one place
        every producer, consumer and admin client is made. kafka-python retries a refused login or TLS
        handshake until bootstrap_timeout_ms and then says only "Unable to bootstrap"; that becomes a
        `KafkaUnavailable` saying which step failed."""
        try:
            return client_class(bootstrap_servers=self.bootstrap, request_timeout_ms=self.request_timeout_ms,
                                bootstrap_timeout_ms=self.request_timeout_ms, **self.security, **options)
        except KafkaTimeoutError as exc:
            raise KafkaUnavailable(redact(
                f"cannot connect to Kafka at {self.bootstrap} over {self.security['security_protocol']} within "
                f"{self.request_timeout_ms / 1000:g} s (bus.kafka.request_timeout_ms): {self._diagnose()}")) from exc

    def _diagnose(self) -> str:
        """Why the first broker did not take us: the TCP and TLS steps tried again with the standard library."""
        host, _, port = self.bootstrap.split(",")[0].strip().rpartition(":")
        where, protocol = f"{host}:{port}", self.security["security_protocol"]
        try:
            sock = socket.create_connection((host, int(port)), timeout=5)
        except (OSError, ValueError) as exc:
            return (f"nothing accepts connections at {where} ({exc}): is the broker up, is "
                    "bus.kafka.bootstrap_servers right?")
        with sock:
            if protocol in ("SSL", "SASL_SSL"):
                try:
                    _tls_context(self.security).wrap_socket(sock, server_hostname=host).close()
                except ssl.SSLCertVerificationError as exc:
                    fix = ("bus.kafka.ssl_check_hostname" if "mismatch" in str(exc.verify_message)
                           else "bus.kafka.ssl_cafile: the PEM file of the CA that signed it")
                    return f"the TLS certificate of {where} is not trusted ({exc.verify_message}): check {fix}"
                except (ssl.SSLError, OSError) as exc:
                    return (f"the TLS handshake with {where} failed ({exc}): is it a TLS listener, is "
                            "bus.kafka.security_protocol right?")
        # TCP (and TLS) work, so the Kafka session itself failed: with SASL, almost always the login.
        mechanism = self.security.get("sasl_mechanism")
        reached = f"{where} accepts {'TLS' if protocol.endswith('SSL') else 'the connection'}"
        if mechanism == "OAUTHBEARER":
            return (f"{reached} but most likely refused the OAUTHBEARER login: check the token that "
                    "bus.kafka.sasl_oauth_token_provider gives")
        if mechanism:
            return (f"{reached} but most likely refused the {mechanism} login: check the user "
                    f"{self.security.get('sasl_plain_username')!r} (bus.kafka.sasl_username) and its password "
                    "(SKYFUSE_BUS__KAFKA__SASL_PASSWORD)")
        return (f"{reached} but does not answer as a {protocol} Kafka listener: is it still starting, or does it "
                "need TLS or a login (bus.kafka.security_protocol)?")

    @property
    def producer(self) -> KafkaProducer:
        with self._lock:
            if self._producer is None:
                self._producer = self.connect(KafkaProducer, client_id=self.client_id, acks="all", linger_ms=0)
            return self._producer

    @property
    def admin(self) -> KafkaAdminClient:
        with self._lock:
            if self._admin is None:
                self._admin = self.connect(KafkaAdminClient, client_id=f"{self.client_id}-admin")
            return self._admin

    def ensure_topics(self, topics: Iterable[str], partitions: int | None = None) -> None:
        with self._admin_lock:
            self._create_missing(list(topics), partitions)

    def _create_missing(self, topics: list[str], partitions: int | None) -> None:
        missing = set(topics) - set(self.admin.list_topics())
        if not missing:
            return
        try:
            self.admin.create_topics(
                [NewTopic(t, partitions or self.default_partitions, 1) for t in sorted(missing)],
                timeout_ms=self.request_timeout_ms,
            )
        except TopicAlreadyExistsError:  # another process won the race
            pass

    def publish(self, topic: str, value: bytes, key: bytes | None = None, headers: Headers | None = None) -> Record:
        future = self.producer.send(topic, value=value, key=key, headers=list(headers or []))
        meta = future.get(timeout=self.request_timeout_ms / 1000)
        return Record(topic, meta.partition, meta.offset, key, value, list(headers or []), meta.timestamp)

    def consumer(self, group: str, topics: list[str], on_revoke: RevokeListener | None = None) -> Consumer:
        self.ensure_topics(topics)
        return KafkaGroupConsumer(self, group, topics, on_revoke)

    def topics(self) -> dict[str, int]:
        with self._admin_lock:
            described = {t["name"]: len(t["partitions"]) for t in self.admin.describe_topics()}
        return {name: described[name] for name in sorted(described) if not name.startswith("__")}

    def _reader(self) -> KafkaConsumer:
        return self.connect(KafkaConsumer, client_id=f"{self.client_id}-reader", enable_auto_commit=False)

    def end_offsets(self, topic: str) -> dict[int, int]:
        return self.end_offsets_of([topic])[topic]

    def end_offsets_of(self, topics: Iterable[str]) -> dict[str, dict[int, int]]:
        reader = self._reader()
        try:
            topics = list(topics)
            reader.topics()  # one metadata request for all of them
            partitions = [KafkaTP(t, p) for t in topics for p in sorted(reader.partitions_for_topic(t) or ())]
            ends = reader.end_offsets(partitions) if partitions else {}
        finally:
            reader.close()
        out: dict[str, dict[int, int]] = {t: {} for t in topics}
        for tp, offset in ends.items():
            out[tp.topic][tp.partition] = offset
        return out

    def committed(self, group: str, topic: str) -> dict[int, int]:
        with self._admin_lock:
            offsets = self.admin.list_group_offsets(group).get(group, {})
        return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset >= 0}

    def read(self, topic: str, limit: int = 1000) -> list[Record]:
        reader = self._reader()
        try:
            partitions = [KafkaTP(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())]
            reader.assign(partitions)
            reader.seek_to_beginning()
            ends = reader.end_offsets(partitions)
            out: list[Record] = []
            while len(out) < limit and any(reader.position(tp) < ends[tp] for tp in partitions):
                for batch in reader.poll(timeout_ms=1000, max_records=limit - len(out)).values():
                    out.extend(_record(r) for r in batch)
            return sorted(out, key=lambda r: (r.timestamp_ms, r.partition, r.offset))[:limit]
        finally:
            reader.close()

    def tail(self, topic: str, per_partition: int = 100) -> list[Record]:
        reader = self._reader()
        try:
            partitions = [KafkaTP(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())]
            reader.assign(partitions)
            starts, ends = reader.beginning_offsets(partitions), reader.end_offsets(partitions)
            for tp in partitions:
                reader.seek(tp, max(starts[tp], ends[tp] - per_partition))
            out: list[Record] = []
            while any(reader.position(tp) < ends[tp] for tp in partitions):
                for batch in reader.poll(timeout_ms=1000).values():
                    out.extend(_record(r) for r in batch if r.offset < ends[KafkaTP(r.topic, r.partition)])
            return sorted(out, key=lambda r: (r.timestamp_ms, r.partition, r.offset))
        finally:
            reader.close()

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)
        if self._admin is not None:
            self._admin.close()


def _record(r: ConsumerRecord) -> Record:
    return Record(r.topic, r.partition, r.offset, r.key, r.value, list(r.headers or []), r.timestamp)


def _tls_context(options: dict[str, Any]) -> ssl.SSLContext:
    """The context kafka-python 3 builds from these options (kafka.net.transport), for `_diagnose`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = options.get("ssl_check_hostname", True)
    if options.get("ssl_cafile"):
        ctx.load_verify_locations(options["ssl_cafile"])
    else:
        ctx.load_default_certs()
    if options.get("ssl_certfile"):
        ctx.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    return ctx


class _Revoke(ConsumerRebalanceListener):  # type: ignore[misc]  # kafka-python ships no types: its base is Any
    def __init__(self, callback: RevokeListener | None):
        self.callback = callback

    def on_partitions_revoked(self, revoked: Collection[KafkaTP]) -> None:
        if self.callback and revoked:
            self.callback([TopicPartition(tp.topic, tp.partition) for tp in revoked])

    def on_partitions_assigned(self, assigned: Collection[KafkaTP]) -> None:
        pass


class KafkaGroupConsumer(Consumer):
    def __init__(self, bus: KafkaBus, group: str, topics: list[str], on_revoke: RevokeListener | None):
        self._consumer = bus.connect(
            KafkaConsumer,
            client_id=f"{bus.client_id}-{group}",
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=max(6000, bus.session_timeout_ms),
            heartbeat_interval_ms=max(6000, bus.session_timeout_ms) // 3,
        )
        self._join_timeout_s = max(6000, bus.session_timeout_ms) / 1000
        self._consumer.subscribe(topics, listener=_Revoke(on_revoke))

    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        # While a (re)join is under way, give poll() time to finish it. kafka-python 3.0 drops a
        # JoinGroup/SyncGroup that completes between two short polls and sends a new one; seen
        # here, the member then stopped heartbeating and was expelled without noticing.
        coordinator = getattr(self._consumer, "_coordinator", None)
        if coordinator is not None and coordinator.need_rejoin():
            timeout_s = max(timeout_s, self._join_timeout_s)
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        return [_record(r) for batch in batches.values() for r in batch]

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if offsets:
            self._consumer.commit({
                KafkaTP(tp.topic, tp.partition): OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()
            })

    def close(self) -> None:
        self._consumer.close(autocommit=False)
