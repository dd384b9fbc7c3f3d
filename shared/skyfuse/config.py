"""The fleet config: one TOML file for clouds, bus and delivery, with a default for every key.

Where it comes from, later wins: built-in defaults, the file (`--config`, else `$SKYFUSE_CONFIG`,
else `./skyfuse.toml` when present), then environment variables `SKYFUSE_<SECTION>__<KEY>`
(double underscore between levels, e.g. `SKYFUSE_BUS__BACKEND=kafka`,
`SKYFUSE_BUS__KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:9092`). Every key is documented below, once.
"""
from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

# msgspec, not pydantic: every function imports the config, and pydantic's import and model
# building cost about 80 ms of each inference host's cold start; msgspec's about 5 ms
import msgspec
from msgspec import Meta, Struct, field

from skyfuse.errors import InvalidInput

FUNCTIONS = ("trainer", "exporter", "fuser", "scheduler", "deployer", "inference", "monitor", "router")
PROVIDERS = ("aws", "gcp", "azure")
ENV_PREFIX = "SKYFUSE_"
ENV_NOT_KEYS = {"SKYFUSE_CONFIG", "SKYFUSE_EVENTS_DIR", "SKYFUSE_CLOUD", "SKYFUSE_FUNCTION", "SKYFUSE_SIGNING_KEY"}
SECRET_KEYS = {"sasl_password"}  # never shown in an error or a repr


class Section(Struct, forbid_unknown_fields=True, kw_only=True):
    """A table of the config. Each key's type carries its rules and description (`Meta`); `load`
    checks every key. A table's own checks (`__post_init__`) also run when one is made in code."""

    def __repr__(self) -> str:
        shown = (f"{f.name}={'<redacted>' if f.name in SECRET_KEYS and value else repr(value)}"
                 for f in msgspec.structs.fields(self) for value in (getattr(self, f.name),))
        return f"{type(self).__name__}({', '.join(shown)})"


class Cloud(Section):
    provider: Annotated[Literal["aws", "gcp", "azure"], Meta(
        description="Which cloud's function runtime and event shapes.")]
    region: Annotated[str, Meta(description="Region name, reported in events and placements.")] = "local"
    price_per_hour: Annotated[float, Meta(ge=0, description="USD per serving replica-hour.")] = 0.05
    price_per_million_requests: Annotated[float, Meta(ge=0, description="USD per million inference requests.")] = 0.2
    capacity_rps: Annotated[float, Meta(gt=0, description="Requests/s one replica sustains within the SLO.")] = 500.0
    store: Annotated[str, Meta(
        description="Object store URI for this cloud's shards and models; default a local folder.")] = ""
    endpoint: Annotated[str, Meta(
        description="Base URL of this cloud's inference function; `skyfuse up` sets it locally.")] = ""
    inference_port: Annotated[int, Meta(
        ge=0, le=65535, description="Port `skyfuse up` serves this cloud's inference on (0: 8101, 8102, … by "
                                    "order).")] = 0


def _default_clouds() -> dict[str, Cloud]:
    return {
        "aws": Cloud(provider="aws", region="us-east-1", price_per_hour=0.0416, price_per_million_requests=0.20),
        "gcp": Cloud(provider="gcp", region="us-central1", price_per_hour=0.0400, price_per_million_requests=0.40),
        "azure": Cloud(provider="azure", region="eastus", price_per_hour=0.0450, price_per_million_requests=0.20),
    }


class EmbeddedBus(Section):
    path: Annotated[str, Meta(description="Folder of the embedded log (a SQLite file).")] = ".skyfuse/bus"
    retention_hours: Annotated[float, Meta(
        gt=0, description="Records older than this are deleted (the newest of each partition is kept, so offsets go"
                          " on); like Kafka's retention.ms.")] = 168.0


class KafkaBus(Section):
    bootstrap_servers: Annotated[str, Meta(description="host:port[,host:port] of the brokers.")] = "127.0.0.1:9092"
    client_id: Annotated[str, Meta(description="Prefix of client ids seen by the broker.")] = "skyfuse"
    session_timeout_ms: Annotated[int, Meta(
        ge=6000, description="Consumer group session timeout; the broker's minimum is 6000.")] = 10_000
    request_timeout_ms: Annotated[int, Meta(
        ge=1000, description="How long connecting to the brokers, or a produce or admin request, may take.")] = 30_000
    # TLS and SASL: infra/kafka/SECURITY.md shows them for the local broker, MSK, Confluent Cloud, Event Hubs.
    security_protocol: Annotated[Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"], Meta(
        description="PLAINTEXT (neither TLS nor login), SSL (TLS), SASL_PLAINTEXT (login without TLS) or SASL_SSL "
                    "(TLS, then a login).")] = "PLAINTEXT"
    ssl_cafile: Annotated[str, Meta(
        description="PEM file of the CA(s) that signed the brokers' certificates; empty: the system's CAs.")] = ""
    ssl_certfile: Annotated[str, Meta(
        description="PEM client certificate (chain) for mutual TLS, the key too unless ssl_keyfile; empty: none.")] = ""
    ssl_keyfile: Annotated[str, Meta(
        description="PEM private key of ssl_certfile, when it is not in that file.")] = ""
    ssl_check_hostname: Annotated[bool, Meta(
        description="Check that a broker's certificate names the host connected to.")] = True
    sasl_mechanism: Annotated[Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"], Meta(
        description="The login of SASL_SSL/SASL_PLAINTEXT: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 (user and password) "
                    "or OAUTHBEARER (a token from sasl_oauth_token_provider, e.g. MSK IAM).")] = ""
    sasl_username: Annotated[str, Meta(description="User of a PLAIN or SCRAM login.")] = ""
    sasl_password: Annotated[str, Meta(
        description="Password of a PLAIN or SCRAM login. Set it in the environment, "
                    "SKYFUSE_BUS__KAFKA__SASL_PASSWORD, not in a file: a secret-looking name, so log lines and "
                    "errors show <redacted> instead of its value.")] = ""
    sasl_oauth_token_provider: Annotated[str, Meta(
        description="For OAUTHBEARER: `package.module:callable` that returns a kafka-python AbstractTokenProvider "
                    "(an instance is used as it is); called once per bus.")] = ""

    def __post_init__(self) -> None:
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


class Bus(Section):
    backend: Annotated[Literal["embedded", "kafka"], Meta(
        description="`embedded` needs no server; `kafka` is Apache Kafka.")] = "embedded"
    partitions: Annotated[int, Meta(ge=1, le=256, description="Partitions of each topic skyfuse creates.")] = 3
    embedded: EmbeddedBus = field(default_factory=EmbeddedBus)
    kafka: KafkaBus = field(default_factory=KafkaBus)


class Delivery(Section):
    max_attempts: Annotated[int, Meta(ge=1, description="Tries of one record before it is dead-lettered.")] = 5
    max_record_age_s: Annotated[float, Meta(
        gt=0, description="A failing record older than this is dead-lettered.")] = 300.0
    backoff_initial_s: Annotated[float, Meta(
        ge=0, description="First retry delay; doubles each try, with full jitter.")] = 0.2
    backoff_max_s: Annotated[float, Meta(ge=0, description="Largest retry delay.")] = 10.0
    poll_timeout_s: Annotated[float, Meta(
        gt=0, description="How long an idle host waits for records per poll.")] = 0.2
    commit_interval_s: Annotated[float, Meta(
        ge=0, description="While records keep coming, a host commits its positions at most this often (each "
                          "commit waits for the broker); an idle host, a stopping one and one losing partitions "
                          "commit at once. A crash redelivers what was done since the last commit. 0: after "
                          "every batch.")] = 0.1
    claim_timeout_s: Annotated[float, Meta(
        gt=0, description="How long a function's idempotency claim on a piece of work lasts: after this, another "
                          "instance takes the work over (its holder is presumed dead). Set it above the longest "
                          "handler run.")] = 120.0


class Signing(Section):
    enabled: Annotated[bool, Meta(
        description="Sign every event emitted (Ed25519, the emitter's own key) and dead-letter every event that is "
                    "unsigned, wrongly signed, too old, or from a producer events/catalog.toml does not allow for "
                    "its type. Off only on a bus nobody else can write to.")] = True
    keys_dir: Annotated[str, Meta(
        description="Folder of `trust.json` (the public keys every consumer trusts) and, locally, "
                    "`private/<cloud>.<function>.pem`; `skyfuse keys init` makes them. In a cloud the function's "
                    "private key comes from the SKYFUSE_SIGNING_KEY environment variable (PEM) instead, set from "
                    "the cloud's secret store.")] = ".skyfuse/keys"
    max_age_s: Annotated[float, Meta(
        gt=0, description="An event signed longer ago than this is refused as a replay. Default: Kafka's default "
                          "retention, so nothing still on the bus is refused.")] = 7 * 24 * 3600.0
    max_skew_s: Annotated[float, Meta(
        ge=0, description="How far in the future an event's signed time may be (clock skew).")] = 300.0


class Tracing(Section):
    otlp_endpoint: Annotated[str, Meta(
        description="OTLP/HTTP collector to export spans to, e.g. http://127.0.0.1:4318 (`/v1/traces` is added "
                    "unless the URL ends with it). Empty: the standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
                    "OTEL_EXPORTER_OTLP_ENDPOINT when set, else tracing is off (events still carry their "
                    "traceparent; no span is recorded). Needs opentelemetry-sdk and "
                    "opentelemetry-exporter-otlp-proto-http (the `otlp` extra).")] = ""
    service_name: Annotated[str, Meta(
        min_length=1, description="service.name of every span; which cloud and function made it are span attributes"
                                  " (cloud.provider, faas.name).")] = "skyfuse"


class Dns(Section):
    """The weighted DNS name the `router` function keeps in step with placement.changed: the front
    door of the real clouds (`skyfuse up` serves a local one on 127.0.0.1)."""

    provider: Annotated[Literal["none", "route53"], Meta(
        description="`none`: no DNS (the router function skips every placement); `route53`: Amazon Route 53 "
                    "weighted records, one per cloud (SetIdentifier = the cloud's name, weight 0-255 from its "
                    "placement weight, target the host of its `endpoint`), set by the control cloud's "
                    "router.")] = "none"
    zone: Annotated[str, Meta(
        description="Hosted zone name, e.g. `skyfuse.example.`; the zone must exist (the deploy templates, or "
                    "infra/emulators/bootstrap.py for LocalStack, make it).")] = ""
    hosted_zone_id: Annotated[str, Meta(
        description="Route 53 hosted zone id (`Z…`); empty: looked up by `zone`.")] = ""
    record: Annotated[str, Meta(
        description="The name callers use, inside the zone, e.g. `api.skyfuse.example.`.")] = ""
    ttl: Annotated[int, Meta(
        ge=0, le=2_147_483_647, description="Seconds resolvers may cache an answer: how long callers may still "
                                            "reach a cloud after a placement moved away from it.")] = 60
    endpoint_url: Annotated[str, Meta(
        description="Route 53 API endpoint, e.g. LocalStack's http://127.0.0.1:4566; empty: AWS's own (or "
                    "$AWS_ENDPOINT_URL).")] = ""

    def __post_init__(self) -> None:
        problems = []
        for key in ("zone", "record"):
            value = getattr(self, key)
            name = value.strip().lower()
            if name and not name.endswith("."):
                name += "."  # fully qualified, as Route 53 answers it
            labels = name[:-1].split(".") if name else []
            if any(not label or len(label) > 63 or not label.replace("-", "").replace("_", "").isalnum()
                   or not label.isascii() for label in labels):
                problems.append(f"{key} {value!r} is not a DNS name: give dot-separated labels of letters, digits, "
                                f"'-' and '_', e.g. {'api.' if key == 'record' else ''}skyfuse.example.")
            setattr(self, key, name)
        if self.provider != "none" and not problems:
            if not self.record:
                problems.append("record is empty: set it to the name callers use, e.g. "
                                "record = \"api.skyfuse.example.\"")
            if not (self.zone or self.hosted_zone_id):
                problems.append("zone and hosted_zone_id are both empty: set zone = \"skyfuse.example.\" (or "
                                "the zone's id) so the records have a zone")
            if self.record and self.zone and not ("." + self.record).endswith("." + self.zone):
                problems.append(f"record {self.record!r} is not inside zone {self.zone!r}: name a record "
                                f"under the zone, e.g. api.{self.zone}")
        if problems:
            raise ValueError("; ".join(problems))


# a batching window only delays a run (the scheduler places each fused model)
CRITICAL_PATH = ("trainer", "exporter", "fuser", "scheduler", "deployer")


class Function(Section):
    ordering: Annotated[Literal["partition", "key", "unordered"], Meta(
        description="In order per partition, per key, or not at all (bounded by `concurrency`).")] = "partition"
    concurrency: Annotated[int, Meta(
        ge=1, le=64, description="Batches in flight at once (of distinct partitions/keys).")] = 1
    clouds: Annotated[list[str] | None, Meta(description="Clouds hosting this function; default every cloud.")] = None
    batch_window_s: Annotated[float, Meta(
        ge=0, le=300, description="How long the trigger gathers records before invoking (Lambda's "
                                  "MaximumBatchingWindowInSeconds). Default: 0 for the functions on a run's "
                                  "critical path (trainer, exporter, fuser, scheduler, deployer: a few events, each"
                                  " waited for), the trigger's own for the rest (Lambda 0.5 s).")] | None = None

    def batch_window(self, function: str, trigger_default_s: float) -> float:
        if self.batch_window_s is not None:
            return self.batch_window_s
        return 0.0 if function in CRITICAL_PATH else trigger_default_s


class Training(Section):
    hidden: Annotated[list[int], Meta(
        min_length=1, description="Units of each hidden layer of the MLP.")] = field(default_factory=lambda: [64, 32])
    epochs: Annotated[int, Meta(
        ge=1, description="Most epochs of a shard's first training (early stopping may end sooner).")] = 100
    finetune_epochs: Annotated[int, Meta(
        ge=1, description="Epochs of each FedAvg round's fine-tuning (all of them run: no early stopping).")] = 5
    finetune_optimizer: Annotated[Literal["adam", "sgd"], Meta(
        description="Optimizer of the fine-tuning rounds: sgd (plain, as FedAvg's clients) or adam.")] = "sgd"
    finetune_learning_rate: Annotated[float, Meta(
        gt=0, description="Learning rate of the first fine-tuning round.")] = 0.3
    finetune_lr_decay: Annotated[float, Meta(
        gt=0, le=1, description="Each later fine-tuning round's learning rate is the one before times this.")] = 0.85
    batch_size: Annotated[int, Meta(ge=1, description="Mini-batch size.")] = 16
    learning_rate: Annotated[float, Meta(gt=0, description="Adam learning rate.")] = 2e-3
    rounds: Annotated[int, Meta(ge=1, description="FedAvg rounds (fusion auto or fedavg).")] = 10
    rounds_patience: Annotated[int, Meta(
        ge=0, description="Stop the rounds early when this many in a row scored no better on validation than the "
                          "best before them (any strategy); 0 runs every round.")] = 3
    proximal_mu: Annotated[float, Meta(
        ge=0, description="FedProx: weight mu of the proximal term mu/2 ||w - w_global||^2 in the fine-tuning "
                          "rounds of a fedprox run.")] = 0.01
    server_lr: Annotated[float, Meta(
        gt=0, description="FedAdam/FedYogi: the server learning rate eta (the step is eta m / (sqrt(v) + "
                          "tau)).")] = 0.03
    server_tau: Annotated[float, Meta(
        gt=0, description="FedAdam/FedYogi: tau, how small sqrt(v) may get before the step stops growing "
                          "(adaptivity).")] = 1e-3
    server_beta1: Annotated[float, Meta(
        ge=0, lt=1, description="FedAdam/FedYogi: decay of the first moment m of the pseudo-gradients.")] = 0.9
    server_beta2: Annotated[float, Meta(
        ge=0, lt=1, description="FedAdam/FedYogi: decay of the second moment v of the pseudo-gradients.")] = 0.99
    quorum_timeout_s: Annotated[float, Meta(
        gt=0, description="How long the fuser waits for missing members before fusing a quorum.")] = 120.0
    timer_s: Annotated[float, Meta(
        gt=0, description="How often timer-driven functions (the fuser's quorum check) run.")] = 2.0


class Scheduler(Section):
    """The placement policy's knobs (`skyfuse.scheduling.policy`: score = C + λ·P, with hysteresis);
    `lambda` itself is top-level. The defaults suit one-minute samples and a 100 ms p99 objective."""

    slo_p99_ms: Annotated[float, Meta(
        gt=0, description="Latency objective: the p99 a cloud should stay under; the latency part of P is 1.0 "
                          "there.")] = 100.0
    margin: Annotated[float, Meta(
        ge=0, lt=1, description="Relative improvement (0.15 = 15 %) the best placement needs over the current one "
                                "before serving moves.")] = 0.15
    dwell_s: Annotated[float, Meta(
        ge=0, description="How long the better placement must stay better by `margin`, at every decision, before "
                          "serving moves.")] = 300.0
    min_dwell_s: Annotated[float, Meta(
        ge=0, description="Minimum age of a placement before any move but a failover.")] = 900.0
    top_k: Annotated[int, Meta(
        ge=1, description="Serve from the k best clouds (more when they lack the capacity), traffic weights ∝ "
                          "1/score.")] = 1
    min_replicas: Annotated[int, Meta(
        ge=0, description="Replicas kept in each serving cloud at least (also the floor of the cost estimate).")] = 1
    stale_after_s: Annotated[float, Meta(
        gt=0, description="A cloud with no metrics.sampled for this long is down (failed over at once when it "
                          "serves).")] = 150.0
    half_life_s: Annotated[float, Meta(
        gt=0, description="Half-life in seconds of the smoothing of every measured figure (latency, errors, "
                          "load).")] = 120.0
    error_budget: Annotated[float, Meta(gt=0, description="Error rate that costs 1.0 in P (0.01: 1 %).")] = 0.01
    failover_error_rate: Annotated[float, Meta(
        gt=0, le=1, description="Smoothed error rate at which a cloud is ineligible, and a serving one failed over "
                                "at once.")] = 0.25
    slo_breach_weight: Annotated[float, Meta(
        ge=0, description="Extra P per unit of p99/SLO above 1 (a p99 10 % over the objective adds 0.4 at the "
                          "default).")] = 4.0
    saturation_knee: Annotated[float, Meta(
        ge=0, lt=1, description="Projected utilisation (load / capacity_rps of the replicas needed) from which "
                                "saturation costs in P.")] = 0.8
    cpu_weight: Annotated[float, Meta(
        ge=0, description="Weight in P of the CPU utilisation the monitor measures on a cloud's serving processes, "
                          "past `resource_knee` (0: not used).")] = 0.0
    memory_weight: Annotated[float, Meta(
        ge=0, description="Weight in P of their memory utilisation, past `resource_knee` (0: not used).")] = 0.0
    network_weight: Annotated[float, Meta(
        ge=0, description="Weight in P of their network throughput / `network_capacity_bytes_per_s`, past "
                          "`resource_knee` (0: not used).")] = 0.0
    resource_knee: Annotated[float, Meta(
        ge=0, lt=1, description="Measured utilisation from which the cpu, memory and network terms cost (1.0 when "
                                "full; 0: the term is weight × utilisation).")] = 0.8
    network_capacity_bytes_per_s: Annotated[float, Meta(
        gt=0, description="Throughput that counts as a full network (125e6 bytes/s = 1 Gbit/s).")] = 125e6
    standby: Annotated[bool, Meta(
        description="Deploy every placed model to every cloud, the ones without traffic as warm standbys "
                    "(deployment.status `standby`): a move or failover needs no copy, and each cloud's serving "
                    "processes can be measured.")] = False


class Monitor(Section):
    """The monitor's response-time probes: each timer tick it times a few GET /health calls to its
    cloud's endpoint from outside the server, as a user waits for them (README "Load signals")."""

    probes: Annotated[int, Meta(
        ge=0, le=100, description="GET /health calls per tick, one after another, timed from connection to last "
                                  "byte (0: no probes, latency null).")] = 3
    probe_timeout_s: Annotated[float, Meta(
        gt=0, le=60, description="A probe without an answer in this time counts as an error (as does a refused one,"
                                 " or a 5xx but 503, which only says no model is loaded).")] = 1.0


class Fleet(Section, dict=True):  # dict: room for `source`, which is not a key
    clouds: dict[str, Cloud] = field(default_factory=_default_clouds)
    bus: Bus = field(default_factory=Bus)
    delivery: Delivery = field(default_factory=Delivery)
    functions: dict[str, Function] = field(default_factory=dict)
    lambda_: Annotated[float, Meta(
        ge=0, description="Weight of performance against cost in placement.")] = field(default=1.0, name="lambda")
    control_cloud: Annotated[str, Meta(
        description="Cloud where the fuser and scheduler act and keep run state; default the first cloud.")] = ""
    scheduler: Scheduler = field(default_factory=Scheduler)
    training: Training = field(default_factory=Training)
    signing: Signing = field(default_factory=Signing)
    tracing: Tracing = field(default_factory=Tracing)
    dns: Dns = field(default_factory=Dns)
    monitor: Monitor = field(default_factory=Monitor)

    def __post_init__(self) -> None:
        if not self.clouds:
            raise ValueError("clouds: at least one cloud is needed, e.g. [clouds.aws] provider = \"aws\"")
        for name, cloud in self.clouds.items():
            if not name.replace("-", "").isalnum() or not name[0].isalpha() or name.lower() != name:
                raise ValueError(f"clouds: cloud name {name!r} must be lowercase letters, digits and '-', starting "
                                 "with a letter")
            if not cloud.store:
                cloud.store = f"file://.skyfuse/stores/{name}"
        for name in self.functions:
            if name not in FUNCTIONS:
                hint = difflib.get_close_matches(name, FUNCTIONS, 1)
                raise ValueError(f"functions: unknown function {name!r}" + (f"; did you mean {hint[0]!r}?" if hint
                                 else "") + f" Known: {', '.join(FUNCTIONS)}")
        if self.control_cloud and self.control_cloud not in self.clouds:
            raise ValueError(f"control_cloud {self.control_cloud!r} is not under [clouds]; "
                             f"configured: {', '.join(self.clouds)}")
        for name, fn in self.functions.items():
            for cloud_name in fn.clouds or ():
                if cloud_name not in self.clouds:
                    raise ValueError(f"functions.{name}.clouds names {cloud_name!r}, which is not under [clouds]; "
                                     f"configured clouds: {', '.join(self.clouds)}")

    @property
    def source(self) -> str | None:
        """The file it was loaded from, absolute (None: defaults only)."""
        source: str | None = self.__dict__.get("source")
        return source

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


S = TypeVar("S", bound="Section")


def _section(kind: Any) -> tuple[type[Section] | None, bool]:
    """(the table type a key holds, whether it is a map of them: `[clouds.<name>]`), or (None, False)."""
    kind = get_args(kind)[0] if get_origin(kind) is Annotated else kind
    if get_origin(kind) is dict:
        inner = get_args(kind)[1]
        return (inner, True) if isinstance(inner, type) and issubclass(inner, Section) else (None, False)
    return (kind, False) if isinstance(kind, type) and issubclass(kind, Section) else (None, False)


def _toml_kind(value: Any) -> str:
    return {str: "string", bool: "boolean", int: "integer", float: "float", list: "array", dict: "table"}.get(
        type(value), type(value).__name__)


_TOML_WORDS = {"object": "table", "str": "string", "int": "integer", "bool": "boolean", "array | null": "array"}


def _rule(error: msgspec.ValidationError, kind: Any, value: Any, at: tuple[str, ...]) -> str:
    """msgspec's message about one value in TOML's words, with the allowed values of a choice, the
    fix of an unquoted string, and the value given (never a secret's)."""
    text = str(error).split(" - at `", 1)[0].replace("`", "").replace("Expected ", "must be ", 1)
    text = re.sub(r"\b(array \| null|object|str|int|bool)\b", lambda m: _TOML_WORDS[m[1]], text)
    choices = next((get_args(k) for k in (kind, *get_args(kind)) if get_origin(k) is Literal), None)
    if choices and text.startswith("Invalid enum value"):
        text = "must be " + " or ".join(map(repr, choices))
    elif text.startswith("must be string,"):  # TOML reads 12345 as a number
        text = (f"must be a string, not a TOML {_toml_kind(value)}: quote it (in the environment too: "
                f"{ENV_PREFIX}{'__'.join(at).upper()}='\"...\"')")
    if at[-1] in SECRET_KEYS or isinstance(value, dict):
        return text
    return f"{text} (got {value!r})"


def _check(data: Any, table: type[Section], where: tuple[str, ...], problems: list[str]) -> None:
    """Every bad key of `data` as a `table` into `problems` (msgspec alone stops at the first): each
    key is converted by itself, tables within it key by key, then the table whole, which runs its
    own checks."""
    if not isinstance(data, dict):
        problems.append(f"{'.'.join(where) or '(top level)'}: must be a table, got {_toml_kind(data)}")
        return
    known = {f.encode_name: f for f in msgspec.structs.fields(table)}
    before = len(problems)
    for key, value in data.items():
        at = (*where, key)
        info = known.get(key)
        if info is None:
            hint = difflib.get_close_matches(str(key), known, 1)
            fix = f"did you mean {hint[0]!r}?" if hint else "remove it"
            problems.append(f"unknown key {'.'.join(at)!r}; {fix} (keys allowed here: {', '.join(known)})")
            continue
        inner, mapped = _section(info.type)
        if inner is not None and mapped and isinstance(value, dict):
            for name, item in value.items():
                _check(item, inner, (*at, name), problems)
        elif inner is not None and not mapped:
            _check(value, inner, at, problems)
        else:
            try:
                msgspec.convert(value, info.type, strict=False)
            except msgspec.ValidationError as exc:
                within = str(exc).partition(" - at `$")[2].rstrip("`")  # e.g. [1]: a list's item
                problems.append(f"{'.'.join(at)}{within}: {_rule(exc, info.type, value, at)}")
    if len(problems) > before:
        return
    try:
        msgspec.convert(data, table, strict=False)
    except msgspec.ValidationError as exc:  # the table's own checks
        table_name = f"{'.'.join(where)}: " if where else ""
        problems.append(table_name + str(exc).split(" - at `", 1)[0])


def descriptions(table: type[Section]) -> dict[str, str]:
    """Each key of a table, as written in the file, and its description ("" for a table within)."""
    def described(kind: Any) -> str:
        if get_origin(kind) is Annotated:
            return next((m.description for m in get_args(kind)[1:] if isinstance(m, Meta) and m.description), "")
        return next((text for text in map(described, get_args(kind)) if text), "")  # `X | None`
    return {f.encode_name: described(f.type) for f in msgspec.structs.fields(table)}


def as_dict(table: Section) -> dict[str, Any]:
    """A table's keys and values, by attribute name (`lambda_`); tables within stay tables."""
    return msgspec.structs.asdict(table)


def replace(table: S, **changes: Any) -> S:
    """A copy of a table with some keys changed, as set in code: its own checks run again."""
    copy = msgspec.structs.replace(table, **changes)
    if isinstance(table, Fleet):
        copy.__dict__.update(table.__dict__)  # where it came from
    return copy


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
    defaults = {} if "clouds" in data else {"clouds": {n: msgspec.to_builtins(c) for n, c in _default_clouds().items()}}
    merged = _merge(_merge(defaults, data), overrides)
    clouds = merged.get("clouds")
    for name, cloud in clouds.items() if isinstance(clouds, dict) else ():
        if isinstance(cloud, dict) and "provider" not in cloud and name in PROVIDERS:
            cloud["provider"] = name  # `[clouds.aws]` needs no `provider = "aws"`
    try:
        fleet = msgspec.convert(merged, Fleet, strict=False)
    except msgspec.ValidationError as exc:  # msgspec names the first bad key; the walk names them all
        problems: list[str] = []
        _check(merged, Fleet, (), problems)
        shown = problems or [str(exc)]
        raise ConfigError("bad fleet config:\n  " + "\n  ".join(f"{origin}: {p}" for p in shown)) from None
    if chosen:
        fleet.__dict__["source"] = str(Path(chosen).resolve())
    return fleet
