"""The fleet config: one TOML file for clouds, bus and delivery, with a default for every key.

Where it comes from, later wins: built-in defaults, the file (`--config`, else `$SKYFUSE_CONFIG`,
else `./skyfuse.toml` when present), then environment variables `SKYFUSE_<SECTION>__<KEY>`
(double underscore between levels, e.g. `SKYFUSE_BUS__BACKEND=kafka`,
`SKYFUSE_BUS__KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:9092`). Every key is documented below, once.
"""
from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from skyfuse.errors import InvalidInput

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

FUNCTIONS = ("trainer", "exporter", "fuser", "scheduler", "deployer", "inference", "monitor", "router")
PROVIDERS = ("aws", "gcp", "azure")
ENV_PREFIX = "SKYFUSE_"
ENV_NOT_KEYS = {"SKYFUSE_CONFIG", "SKYFUSE_EVENTS_DIR", "SKYFUSE_CLOUD", "SKYFUSE_FUNCTION", "SKYFUSE_SIGNING_KEY"}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class Cloud(Section):
    provider: Literal["aws", "gcp", "azure"] = Field(description="Which cloud's function runtime and event shapes.")
    region: str = Field("local", description="Region name, reported in events and placements.")
    price_per_hour: float = Field(0.05, ge=0, description="USD per serving replica-hour.")
    price_per_million_requests: float = Field(0.2, ge=0, description="USD per million inference requests.")
    capacity_rps: float = Field(500.0, gt=0, description="Requests/s one replica sustains within the SLO.")
    store: str = Field("", description="Object store URI for this cloud's shards and models; default a local folder.")
    endpoint: str = Field("", description="Base URL of this cloud's inference function; `skyfuse up` sets it locally.")
    inference_port: int = Field(
        0, ge=0, le=65535, description="Port `skyfuse up` serves this cloud's inference on (0: 8101, 8102, … by "
                                       "order).")


def _default_clouds() -> dict[str, Cloud]:
    return {
        "aws": Cloud(provider="aws", region="us-east-1", price_per_hour=0.0416, price_per_million_requests=0.20),
        "gcp": Cloud(provider="gcp", region="us-central1", price_per_hour=0.0400, price_per_million_requests=0.40),
        "azure": Cloud(provider="azure", region="eastus", price_per_hour=0.0450, price_per_million_requests=0.20),
    }


class EmbeddedBus(Section):
    path: str = Field(".skyfuse/bus", description="Folder of the embedded log (a SQLite file).")
    retention_hours: float = Field(
        168.0, gt=0, description="Records older than this are deleted (the newest of each partition is kept, so "
                                 "offsets go on); like Kafka's retention.ms.")


class KafkaBus(Section):
    bootstrap_servers: str = Field("127.0.0.1:9092", description="host:port[,host:port] of the brokers.")
    client_id: str = Field("skyfuse", description="Prefix of client ids seen by the broker.")
    session_timeout_ms: int = Field(
        10_000, ge=6000, description="Consumer group session timeout; the broker's minimum is 6000.")
    request_timeout_ms: int = Field(
        30_000, ge=1000, description="How long connecting to the brokers, or a produce or admin request, may take.")
    # TLS and SASL: infra/kafka/SECURITY.md shows them for the local broker, MSK, Confluent Cloud, Event Hubs.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="PLAINTEXT (neither TLS nor login), SSL (TLS), SASL_PLAINTEXT (login without "
                                 "TLS) or SASL_SSL (TLS, then a login).")
    ssl_cafile: str = Field(
        "", description="PEM file of the CA(s) that signed the brokers' certificates; empty: the system's CAs.")
    ssl_certfile: str = Field(
        "", description="PEM client certificate (chain) for mutual TLS, the key too unless ssl_keyfile; empty: none.")
    ssl_keyfile: str = Field("", description="PEM private key of ssl_certfile, when it is not in that file.")
    ssl_check_hostname: bool = Field(True, description="Check that a broker's certificate names the host connected to.")
    sasl_mechanism: Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] = Field(
        "", description="The login of SASL_SSL/SASL_PLAINTEXT: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 (user and "
                        "password) or OAUTHBEARER (a token from sasl_oauth_token_provider, e.g. MSK IAM).")
    sasl_username: str = Field("", description="User of a PLAIN or SCRAM login.")
    sasl_password: str = Field(
        "", repr=False, description="Password of a PLAIN or SCRAM login. Set it in the environment, "
                                    "SKYFUSE_BUS__KAFKA__SASL_PASSWORD, not in a file: a secret-looking name, so "
                                    "log lines and errors show <redacted> instead of its value.")
    sasl_oauth_token_provider: str = Field(
        "", description="For OAUTHBEARER: `package.module:callable` that returns a kafka-python AbstractTokenProvider "
                        "(an instance is used as it is); called once per bus.")

    @model_validator(mode="before")
    @classmethod
    def _credentials_are_strings(cls, data: Any) -> Any:  # the raw input, before validation
        # Checked before pydantic's own type check, whose message would quote the value.
        for key in ("sasl_username", "sasl_password"):
            if isinstance(data, dict) and not isinstance(data.get(key, ""), str):
                raise ValueError(f"{key} must be a string, not a TOML {type(data[key]).__name__}: quote it (in "
                                 f"the environment too: SKYFUSE_BUS__KAFKA__{key.upper()}='\"...\"')")
        return data

    @model_validator(mode="after")
    def _security(self) -> KafkaBus:
        protocol, mechanism = self.security_protocol, self.sasl_mechanism
        tls, sasl = protocol in ("SSL", "SASL_SSL"), protocol.startswith("SASL_")
        problems = []
        if sasl and not mechanism:
            problems.append(f"security_protocol {protocol} needs sasl_mechanism: set it to SCRAM-SHA-512, "
                            "SCRAM-SHA-256, PLAIN or OAUTHBEARER")
        if mechanism and not sasl:
            problems.append(f"sasl_mechanism {mechanism} needs security_protocol SASL_SSL (or SASL_PLAINTEXT), "
                            f"not {protocol}: set security_protocol = \"SASL_SSL\"")
        if mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            if not self.sasl_username:
                problems.append(f"sasl_mechanism {mechanism} needs sasl_username: set it")
            if not self.sasl_password:
                problems.append(f"sasl_mechanism {mechanism} needs sasl_password: set the environment variable "
                                "SKYFUSE_BUS__KAFKA__SASL_PASSWORD")
        elif self.sasl_username or self.sasl_password:  # a login meant, but none would be sent
            problems.append(f"sasl_username/sasl_password are set but sasl_mechanism is {mechanism or 'empty'}: "
                            "set sasl_mechanism = \"SCRAM-SHA-512\" (or SCRAM-SHA-256, PLAIN), or remove them")
        provider = self.sasl_oauth_token_provider
        if mechanism == "OAUTHBEARER" and not provider:
            problems.append("sasl_mechanism OAUTHBEARER needs sasl_oauth_token_provider: set it to "
                            "\"package.module:callable\" returning a kafka-python AbstractTokenProvider")
        if provider and mechanism != "OAUTHBEARER":
            problems.append(f"sasl_oauth_token_provider is set but sasl_mechanism is {mechanism or 'empty'}: "
                            "set sasl_mechanism = \"OAUTHBEARER\"")
        module, _, attr = provider.partition(":")
        if provider and not (module and attr and all(p.isidentifier() for p in (*module.split("."), *attr.split(".")))):
            problems.append(f"sasl_oauth_token_provider {provider!r} is not \"package.module:callable\"")
        files = {k: v for k, v in (("ssl_cafile", self.ssl_cafile), ("ssl_certfile", self.ssl_certfile),
                                   ("ssl_keyfile", self.ssl_keyfile)) if v}
        if files and not tls:  # TLS meant, but the connection would be in clear text
            problems.append(f"{', '.join(files)} {'is' if len(files) == 1 else 'are'} set but security_protocol "
                            f"{protocol} has no TLS: set security_protocol = \"SSL\" or \"SASL_SSL\"")
        for key, path in files.items():
            if not Path(path).is_file():
                problems.append(f"{key} {path!r}: no such file (relative paths start at {os.getcwd()}); "
                                "give the path of the PEM file")
        if self.ssl_keyfile and not self.ssl_certfile:
            problems.append("ssl_keyfile needs ssl_certfile, the client certificate it belongs to: set it")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Bus(Section):
    backend: Literal["embedded", "kafka"] = Field(
        "embedded", description="`embedded` needs no server; `kafka` is Apache Kafka.")
    partitions: int = Field(3, ge=1, le=256, description="Partitions of each topic skyfuse creates.")
    embedded: EmbeddedBus = EmbeddedBus()
    kafka: KafkaBus = KafkaBus()


class Delivery(Section):
    max_attempts: int = Field(5, ge=1, description="Tries of one record before it is dead-lettered.")
    max_record_age_s: float = Field(300.0, gt=0, description="A failing record older than this is dead-lettered.")
    backoff_initial_s: float = Field(0.2, ge=0, description="First retry delay; doubles each try, with full jitter.")
    backoff_max_s: float = Field(10.0, ge=0, description="Largest retry delay.")
    poll_timeout_s: float = Field(0.2, gt=0, description="How long an idle host waits for records per poll.")
    claim_timeout_s: float = Field(
        120.0, gt=0, description="How long a function's idempotency claim on a piece of work lasts: after this, "
                                 "another instance takes the work over (its holder is presumed dead). Set it "
                                 "above the longest handler run.")


class Signing(Section):
    enabled: bool = Field(
        True, description="Sign every event emitted (Ed25519, the emitter's own key) and dead-letter every event "
                          "that is unsigned, wrongly signed, too old, or from a producer events/catalog.toml does "
                          "not allow for its type. Off only on a bus nobody else can write to.")
    keys_dir: str = Field(
        ".skyfuse/keys", description="Folder of `trust.json` (the public keys every consumer trusts) and, locally, "
                                     "`private/<cloud>.<function>.pem`; `skyfuse keys init` makes them. In a cloud "
                                     "the function's private key comes from the SKYFUSE_SIGNING_KEY environment "
                                     "variable (PEM) instead, set from the cloud's secret store.")
    max_age_s: float = Field(
        7 * 24 * 3600.0, gt=0, description="An event signed longer ago than this is refused as a replay. Default: "
                                           "Kafka's default retention, so nothing still on the bus is refused.")
    max_skew_s: float = Field(
        300.0, ge=0, description="How far in the future an event's signed time may be (clock skew).")


class Tracing(Section):
    otlp_endpoint: str = Field(
        "", description="OTLP/HTTP collector to export spans to, e.g. http://127.0.0.1:4318 (`/v1/traces` is "
                        "added unless the URL ends with it). Empty: the standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT "
                        "or OTEL_EXPORTER_OTLP_ENDPOINT when set, else tracing is off (events still carry their "
                        "traceparent; no span is recorded). Needs opentelemetry-sdk and "
                        "opentelemetry-exporter-otlp-proto-http (the `otlp` extra).")
    service_name: str = Field("skyfuse", min_length=1, description="service.name of every span; which cloud and "
                                                                    "function made it are span attributes "
                                                                    "(cloud.provider, faas.name).")


class Dns(Section):
    """The weighted DNS name the `router` function keeps in step with placement.changed: the front
    door of the real clouds (`skyfuse up` serves a local one on 127.0.0.1)."""

    provider: Literal["none", "route53"] = Field(
        "none", description="`none`: no DNS (the router function skips every placement); `route53`: Amazon Route 53 "
                            "weighted records, one per cloud (SetIdentifier = the cloud's name, weight 0-255 from its "
                            "placement weight, target the host of its `endpoint`), set by the control cloud's router.")
    zone: str = Field("", description="Hosted zone name, e.g. `skyfuse.example.`; the zone must exist (the deploy "
                                      "templates, or infra/emulators/bootstrap.py for LocalStack, make it).")
    hosted_zone_id: str = Field("", description="Route 53 hosted zone id (`Z…`); empty: looked up by `zone`.")
    record: str = Field("", description="The name callers use, inside the zone, e.g. `api.skyfuse.example.`.")
    ttl: int = Field(60, ge=0, le=2_147_483_647,
                     description="Seconds resolvers may cache an answer: how long callers may still reach a cloud "
                                 "after a placement moved away from it.")
    endpoint_url: str = Field("", description="Route 53 API endpoint, e.g. LocalStack's http://127.0.0.1:4566; "
                                              "empty: AWS's own (or $AWS_ENDPOINT_URL).")

    @field_validator("zone", "record")
    @classmethod
    def _dns_name(cls, value: str, info: ValidationInfo) -> str:
        name = value.strip().lower()
        if name and not name.endswith("."):
            name += "."  # fully qualified, as Route 53 answers it
        labels = name[:-1].split(".") if name else []
        if any(not label or len(label) > 63 or not label.replace("-", "").replace("_", "").isalnum()
               or not label.isascii() for label in labels):
            raise ValueError(f"{value!r} is not a DNS name: give dot-separated labels of letters, digits, '-' and "
                             f"'_', e.g. {'api.' if info.field_name == 'record' else ''}skyfuse.example.")
        return name

    @model_validator(mode="after")
    def _complete(self) -> Dns:
        if self.provider == "none":
            return self
        problems = []
        if not self.record:
            problems.append("dns.record is empty: set it to the name callers use, e.g. "
                            "record = \"api.skyfuse.example.\"")
        if not (self.zone or self.hosted_zone_id):
            problems.append("dns.zone and dns.hosted_zone_id are both empty: set zone = \"skyfuse.example.\" (or the "
                            "zone's id) so the records have a zone")
        if self.record and self.zone and not ("." + self.record).endswith("." + self.zone):
            problems.append(f"dns.record {self.record!r} is not inside dns.zone {self.zone!r}: name a record under "
                            f"the zone, e.g. api.{self.zone}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# a batching window only delays a run (the scheduler places each fused model)
CRITICAL_PATH = ("trainer", "exporter", "fuser", "scheduler", "deployer")


class Function(Section):
    ordering: Literal["partition", "key", "unordered"] = Field(
        "partition", description="In order per partition, per key, or not at all (bounded by `concurrency`).")
    concurrency: int = Field(1, ge=1, le=64, description="Batches in flight at once (of distinct partitions/keys).")
    clouds: list[str] | None = Field(None, description="Clouds hosting this function; default every cloud.")
    batch_window_s: float | None = Field(
        None, ge=0, le=300, description="How long the trigger gathers records before invoking (Lambda's "
        "MaximumBatchingWindowInSeconds). Default: 0 for the functions on a run's critical path (trainer, exporter, "
        "fuser, scheduler, deployer: a few events, each waited for), the trigger's own for the rest (Lambda 0.5 s).")

    def batch_window(self, function: str, trigger_default_s: float) -> float:
        if self.batch_window_s is not None:
            return self.batch_window_s
        return 0.0 if function in CRITICAL_PATH else trigger_default_s


class Training(Section):
    hidden: list[int] = Field([64, 32], min_length=1, description="Units of each hidden layer of the MLP.")
    epochs: int = Field(
        100, ge=1, description="Most epochs of a shard's first training (early stopping may end sooner).")
    finetune_epochs: int = Field(
        5, ge=1, description="Epochs of each FedAvg round's fine-tuning (all of them run: no early stopping).")
    finetune_optimizer: Literal["adam", "sgd"] = Field(
        "sgd", description="Optimizer of the fine-tuning rounds: sgd (plain, as FedAvg's clients) or adam.")
    finetune_learning_rate: float = Field(0.3, gt=0, description="Learning rate of the first fine-tuning round.")
    finetune_lr_decay: float = Field(
        0.85, gt=0, le=1, description="Each later fine-tuning round's learning rate is the one before times this.")
    batch_size: int = Field(16, ge=1, description="Mini-batch size.")
    learning_rate: float = Field(2e-3, gt=0, description="Adam learning rate.")
    rounds: int = Field(10, ge=1, description="FedAvg rounds (fusion auto or fedavg).")
    rounds_patience: int = Field(
        3, ge=0, description="Stop the rounds early when this many in a row scored no better on validation than the "
                             "best before them (any strategy); 0 runs every round.")
    proximal_mu: float = Field(
        0.01, ge=0, description="FedProx: weight mu of the proximal term mu/2 ||w - w_global||^2 in the fine-tuning "
                                "rounds of a fedprox run.")
    server_lr: float = Field(
        0.03, gt=0, description="FedAdam/FedYogi: the server learning rate eta (the step is eta m / (sqrt(v) + tau)).")
    server_tau: float = Field(
        1e-3, gt=0, description="FedAdam/FedYogi: tau, how small sqrt(v) may get before the step stops growing "
                                "(adaptivity).")
    server_beta1: float = Field(
        0.9, ge=0, lt=1, description="FedAdam/FedYogi: decay of the first moment m of the pseudo-gradients.")
    server_beta2: float = Field(
        0.99, ge=0, lt=1, description="FedAdam/FedYogi: decay of the second moment v of the pseudo-gradients.")
    quorum_timeout_s: float = Field(
        120.0, gt=0, description="How long the fuser waits for missing members before fusing a quorum.")
    timer_s: float = Field(2.0, gt=0, description="How often timer-driven functions (the fuser's quorum check) run.")


class Scheduler(Section):
    """The placement policy's knobs (`skyfuse.scheduling.policy`: score = C + λ·P, with hysteresis);
    `lambda` itself is top-level. The defaults suit one-minute samples and a 100 ms p99 objective."""

    slo_p99_ms: float = Field(100.0, gt=0, description="Latency objective: the p99 a cloud should stay under; "
                                                       "the latency part of P is 1.0 there.")
    margin: float = Field(0.15, ge=0, lt=1, description="Relative improvement (0.15 = 15 %) the best placement "
                                                        "needs over the current one before serving moves.")
    dwell_s: float = Field(300.0, ge=0, description="How long the better placement must stay better by `margin`, "
                                                    "at every decision, before serving moves.")
    min_dwell_s: float = Field(900.0, ge=0, description="Minimum age of a placement before any move but a "
                                                        "failover.")
    top_k: int = Field(1, ge=1, description="Serve from the k best clouds (more when they lack the capacity), "
                                            "traffic weights ∝ 1/score.")
    min_replicas: int = Field(1, ge=0, description="Replicas kept in each serving cloud at least (also the floor "
                                                   "of the cost estimate).")
    stale_after_s: float = Field(150.0, gt=0, description="A cloud with no metrics.sampled for this long is down "
                                                          "(failed over at once when it serves).")
    half_life_s: float = Field(120.0, gt=0, description="Half-life in seconds of the smoothing of every "
                                                        "measured figure (latency, errors, load).")
    error_budget: float = Field(0.01, gt=0, description="Error rate that costs 1.0 in P (0.01: 1 %).")
    failover_error_rate: float = Field(0.25, gt=0, le=1, description="Smoothed error rate at which a cloud is "
                                                                     "ineligible, and a serving one failed over at "
                                                                     "once.")
    slo_breach_weight: float = Field(4.0, ge=0, description="Extra P per unit of p99/SLO above 1 (a p99 10 % "
                                                            "over the objective adds 0.4 at the default).")
    saturation_knee: float = Field(0.8, ge=0, lt=1, description="Projected utilisation (load / capacity_rps of the "
                                                                "replicas needed) from which saturation costs in P.")
    cpu_weight: float = Field(0.0, ge=0, description="Weight in P of the CPU utilisation the monitor measures on a "
                                                     "cloud's serving processes, past `resource_knee` (0: not used).")
    memory_weight: float = Field(0.0, ge=0, description="Weight in P of their memory utilisation, past "
                                                        "`resource_knee` (0: not used).")
    network_weight: float = Field(0.0, ge=0, description="Weight in P of their network throughput / "
                                                         "`network_capacity_bytes_per_s`, past `resource_knee` "
                                                         "(0: not used).")
    resource_knee: float = Field(0.8, ge=0, lt=1, description="Measured utilisation from which the cpu, memory "
                                                              "and network terms cost (1.0 when full; 0: the "
                                                              "term is weight × utilisation).")
    network_capacity_bytes_per_s: float = Field(125e6, gt=0, description="Throughput that counts as a full "
                                                                         "network (125e6 bytes/s = 1 Gbit/s).")
    standby: bool = Field(False, description="Deploy every placed model to every cloud, the ones without traffic "
                                             "as warm standbys (deployment.status `standby`): a move or failover "
                                             "needs no copy, and each cloud's serving processes can be measured.")


class Monitor(Section):
    """The monitor's response-time probes: each timer tick it times a few GET /health calls to its
    cloud's endpoint from outside the server, as a user waits for them (README "Load signals")."""

    probes: int = Field(3, ge=0, le=100, description="GET /health calls per tick, one after another, timed "
                                                     "from connection to last byte (0: no probes, latency null).")
    probe_timeout_s: float = Field(1.0, gt=0, le=60, description="A probe without an answer in this time counts "
                                                                 "as an error (as does a refused one, or a 5xx "
                                                                 "but 503, which only says no model is loaded).")


class Fleet(Section):
    _source: str | None = PrivateAttr(None)  # the file it was loaded from, absolute (None: defaults only)
    clouds: dict[str, Cloud] = Field(default_factory=_default_clouds)
    bus: Bus = Bus()
    delivery: Delivery = Delivery()
    functions: dict[str, Function] = Field(default_factory=dict)
    lambda_: float = Field(1.0, ge=0, alias="lambda", description="Weight of performance against cost in placement.")
    control_cloud: str = Field(
        "", description="Cloud where the fuser and scheduler act and keep run state; default the first cloud.")
    scheduler: Scheduler = Field(default_factory=lambda: Scheduler())
    training: Training = Field(default_factory=lambda: Training())
    signing: Signing = Signing()
    tracing: Tracing = Tracing()
    dns: Dns = Dns()
    monitor: Monitor = Monitor()

    @model_validator(mode="before")
    @classmethod
    def _provider_from_name(cls, data: Any) -> Any:  # the raw input, before validation
        """`[clouds.aws]` needs no `provider = "aws"`."""
        for name, cloud in (data.get("clouds") or {}).items() if isinstance(data, dict) else ():
            if isinstance(cloud, dict) and "provider" not in cloud and name in PROVIDERS:
                cloud["provider"] = name
        return data

    @field_validator("clouds")
    @classmethod
    def _cloud_names(cls, clouds: dict[str, Cloud]) -> dict[str, Cloud]:
        if not clouds:
            raise ValueError("at least one cloud is needed, e.g. [clouds.aws] provider = \"aws\"")
        for name in clouds:
            if not name.replace("-", "").isalnum() or not name[0].isalpha() or name.lower() != name:
                raise ValueError(f"cloud name {name!r} must be lowercase letters, digits and '-', starting with a "
                                 "letter")
        return clouds

    @field_validator("functions")
    @classmethod
    def _function_names(cls, functions: dict[str, Function]) -> dict[str, Function]:
        for name in functions:
            if name not in FUNCTIONS:
                hint = difflib.get_close_matches(name, FUNCTIONS, 1)
                raise ValueError(f"unknown function {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                                 + f" Known: {', '.join(FUNCTIONS)}")
        return functions

    @model_validator(mode="after")
    def _fill(self) -> Fleet:
        for name, cloud in self.clouds.items():
            if not cloud.store:
                cloud.store = f"file://.skyfuse/stores/{name}"
        if self.control_cloud and self.control_cloud not in self.clouds:
            raise ValueError(f"control_cloud {self.control_cloud!r} is not under [clouds]; "
                             f"configured: {', '.join(self.clouds)}")
        for name, fn in self.functions.items():
            for cloud_name in fn.clouds or ():
                if cloud_name not in self.clouds:
                    raise ValueError(f"functions.{name}.clouds names {cloud_name!r}, which is not under [clouds]; "
                                     f"configured clouds: {', '.join(self.clouds)}")
        return self

    def function(self, name: str) -> Function:
        return self.functions.get(name) or Function()

    def clouds_for(self, function: str) -> list[str]:
        return self.function(function).clouds or list(self.clouds)


class ConfigError(InvalidInput):
    """A config file, key or value that cannot work; the message names the key and what to change."""


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """`SKYFUSE_BUS__KAFKA__BOOTSTRAP_SERVERS=x` → {"bus": {"kafka": {"bootstrap_servers": "x"}}}."""
    tree: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if (not name.startswith(ENV_PREFIX) or name in ENV_NOT_KEYS
                or name.startswith(("SKYFUSE_TEST_", "SKYFUSE_SIGNING_KEY"))):
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        try:  # TOML syntax gives numbers, booleans and lists; anything else stays a string
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _describe(error: ErrorDetails, origin: str) -> str:
    loc = ".".join(str(p) for p in error["loc"] if p not in ("function-after",))
    if error["type"] == "extra_forbidden":
        parent_path, key = error["loc"][:-1], error["loc"][-1]
        model: type[BaseModel] = Fleet
        for part in parent_path:
            field = model.model_fields.get(str(part)) or model.model_fields.get(f"{part}_")
            annotation = field.annotation if field else None
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                model = annotation
            elif annotation is not None and getattr(annotation, "__args__", None):
                model = annotation.__args__[-1]  # dict[str, Cloud] and friends
        known = [f.alias or n for n, f in model.model_fields.items()]
        hint = difflib.get_close_matches(str(key), known, 1)
        fix = f"did you mean {hint[0]!r}?" if hint else "remove it"
        return f"{origin}: unknown key {loc!r}; {fix} (keys allowed here: {', '.join(known)})"
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{origin}: {loc or '(top level)'}: {error['msg']}{shown}"


def load(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Fleet:
    """The fleet config; raises `ConfigError` naming every bad key and how to fix it."""
    environ = dict(os.environ if environ is None else environ)
    chosen = path or environ.get("SKYFUSE_CONFIG") or ("skyfuse.toml" if Path("skyfuse.toml").exists() else None)
    data: dict[str, Any] = {}
    origin = "defaults"
    if chosen:
        origin = str(chosen)
        try:
            data = tomllib.loads(Path(chosen).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{chosen}: no such config file; pass --config PATH or unset SKYFUSE_CONFIG") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{chosen}: not valid TOML: {exc}") from None
    overrides = _env_overrides(environ)
    if overrides:
        origin += " + SKYFUSE_* environment"
    try:
        defaults = {} if "clouds" in data else {"clouds": {n: c.model_dump() for n, c in _default_clouds().items()}}
        fleet = Fleet.model_validate(_merge(_merge(defaults, data), overrides))
    except ValidationError as exc:
        lines = [_describe(e, origin) for e in exc.errors()]
        raise ConfigError("bad fleet config:\n  " + "\n  ".join(lines)) from None
    fleet._source = str(Path(chosen).resolve()) if chosen else None
    return fleet
