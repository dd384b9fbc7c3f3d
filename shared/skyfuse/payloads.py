"""The `data` of each event type as a TypedDict, for the type checker: a handler writes
`data = cast(ShardReady, event.get_data())` and keeps `data["run_id"]` access, checked key by key.

The JSON Schemas in `events/schemas` stay the one definition (and what validates events at run
time); these types mirror them: the same properties, the same required ones, nested objects as
their own TypedDicts, enums as Literals. `tests/unit/test_payloads.py` compares each one with its
schema, so the two cannot drift apart. What a TypedDict cannot say (patterns, bounds, "reason is
required when state is failed") only the schema checks.

No `from __future__ import annotations` here: TypedDict reads Required/NotRequired from the
evaluated annotations.
"""
from typing import Literal, NotRequired, TypedDict

Label = int | str  # a class label (events/schemas: $defs/label)
Task = Literal["binary", "multiclass"]
Strategy = Literal["wavg", "vote", "confidence", "fedavg", "fedprox", "fedadam", "fedyogi"]
Fusion = Literal["auto", "wavg", "vote", "confidence", "fedavg", "fedprox", "fedadam", "fedyogi"]
DeploymentState = Literal["deploying", "serving", "standby", "draining", "removed", "failed"]


class Manifest(TypedDict):
    """The run-wide plan, identical in every training event of a run."""

    expected_members: int
    clouds: list[str]
    quorum: int
    timeout_s: float
    fusion: Fusion
    rounds: int
    weights: NotRequired[dict[str, float]]


class Standardization(TypedDict):
    mean: list[float]
    variance: list[float]


class ModelSettings(TypedDict, total=False):
    """shard.ready `model`: what the trainer trains; anything left out takes its defaults."""

    hidden: list[int]
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    finetune_epochs: int
    optimizer: Literal["adam", "sgd"]
    init: Literal["glorot", "normal"]
    early_stopping: bool
    proximal_mu: float
    init_uri: str
    init_sha256: str
    template_uri: str
    template_sha256: str
    standardization: Standardization


class Validation(TypedDict):
    """A member's scores on its shard's validation rows."""

    rows: int
    accuracy: float
    loss: float


class Tensor(TypedDict):
    name: str
    shape: list[int | str | None]
    dtype: Literal["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool", "string"]


class ShardReady(TypedDict):
    run_id: str
    round: int
    shard_id: str
    cloud: str
    uri: str
    sha256: str
    bytes: NotRequired[int]
    rows: int
    features: list[str]
    target: str
    task: Task
    classes: list[Label]
    class_counts: NotRequired[dict[str, int]]
    partition: Literal["iid", "stratified", "kmeans", "label-skew"]
    manifest: Manifest
    model: NotRequired[ModelSettings]


class RoundStarted(TypedDict):
    run_id: str
    round: int
    global_model_uri: str
    sha256: str
    clouds: list[str]
    epochs: int
    manifest: Manifest


class ModelReady(TypedDict):
    run_id: str
    round: int
    shard_id: str
    cloud: str
    model_uri: str
    sha256: str
    samples: int
    validation: Validation
    features: list[str]
    classes: list[Label]
    task: Task
    manifest: Manifest
    train_seconds: NotRequired[float]
    validation_uri: NotRequired[str]
    validation_sha256: NotRequired[str]


class OnnxReady(TypedDict):
    run_id: str
    round: int
    shard_id: str
    cloud: str
    onnx_uri: str
    sha256: str
    source_sha256: NotRequired[str]
    opset: int
    inputs: list[Tensor]
    outputs: list[Tensor]
    parity_max_abs_diff: float
    samples: int
    validation: Validation
    features: NotRequired[list[str]]
    classes: list[Label]
    task: Task
    manifest: Manifest
    model_uri: NotRequired[str]


class FusedMember(TypedDict):
    cloud: str
    shard_id: str
    weight: float
    samples: int
    accuracy: float


class FusedMetrics(TypedDict):
    validation_accuracy: float
    test_accuracy: NotRequired[float]
    validation_rows: NotRequired[int]
    test_rows: NotRequired[int]


class FusedReady(TypedDict):
    run_id: str
    version: str
    round: NotRequired[int]
    strategy: Strategy
    model_uri: str
    sha256: str
    cloud: str
    members: list[FusedMember]
    missing_clouds: NotRequired[list[str]]
    metrics: FusedMetrics
    strategies: dict[str, float]  # strategy → validation accuracy
    opset: int
    features: NotRequired[list[str]]
    classes: list[Label]
    task: NotRequired[Task]
    candidates: NotRequired[dict[str, str]]  # strategy → ONNX URI


class Latency(TypedDict):
    p50: float | None
    p99: float | None


class Price(TypedDict):
    per_hour: float
    per_million_requests: float
    currency: NotRequired[str]


class MetricsSampled(TypedDict):
    cloud: str
    source: Literal["inference", "monitor"]
    window_s: float
    sampled_at: str
    requests: int
    requests_per_s: float
    latency_ms: Latency
    error_rate: float
    load: float
    cpu_utilisation: NotRequired[float | None]
    memory_utilisation: NotRequired[float | None]
    network_bytes_per_s: NotRequired[float | None]
    capacity_rps: NotRequired[float]
    replicas: NotRequired[int]
    price: Price
    model_version: NotRequired[str | None]


class DecisionClock(TypedDict):
    source: Literal["event", "clock"]
    event_time: str
    note: NotRequired[str]


class CloudPlacement(TypedDict):
    cloud: str
    weight: float
    replicas: int


class CloudScore(TypedDict):
    cloud: str
    cost: float
    performance: float
    total: float
    eligible: bool
    note: NotRequired[str]


class PolicyInForce(TypedDict):
    margin: float
    dwell_s: float
    min_replicas: int


# the functional form: `lambda` is a Python keyword
PlacementChanged = TypedDict("PlacementChanged", {
    "decision_id": str,
    "sequence": NotRequired[int],
    "decided_at": str,
    "clock": NotRequired[DecisionClock],
    "trigger": NotRequired[Literal["model", "metrics", "deployment", "manual"]],
    "model_version": str,
    "model_uri": str,
    "sha256": str,
    "source_cloud": str,
    "placements": list[CloudPlacement],
    "previous": list[CloudPlacement],
    "lambda": float,
    "scores": list[CloudScore],
    "reason": str,
    "policy": PolicyInForce,
})


class DeploymentStatus(TypedDict):
    decision_id: str
    cloud: str
    model_version: str
    state: DeploymentState
    sha256: NotRequired[str]
    endpoint: NotRequired[str]
    replicas: NotRequired[int]
    reason: NotRequired[str]
    at: str
    warm_ms: NotRequired[float]


BY_TYPE: dict[str, type] = {
    "shard.ready": ShardReady, "round.started": RoundStarted, "model.ready": ModelReady, "onnx.ready": OnnxReady,
    "fused.ready": FusedReady, "metrics.sampled": MetricsSampled, "placement.changed": PlacementChanged,
    "deployment.status": DeploymentStatus,
}
