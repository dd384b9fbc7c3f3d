"""What `skyfuse train` and `skyfuse demo` share: their options as typed values, the plan made from
them, and a run on the local fleet (`skyfuse.dev.runs`) shown with progress bars and tables."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from skyfuse import training
from skyfuse.cli.common import err, fail, out, ready_bus
from skyfuse.cli.tables import print_summary
from skyfuse.config import Fleet
from skyfuse.ml import federated

if TYPE_CHECKING:
    from skyfuse.dev.runs import Step
    from skyfuse.ml.data import Dataset

PARTITIONS = ("iid", "stratified", "kmeans", "label-skew")
FUSIONS = federated.FUSIONS
PARTITION_HELP = "iid | stratified | kmeans | label-skew:ALPHA"
FUSION_HELP = "auto | " + " | ".join(f for f in FUSIONS if f != "auto")
WEIGHTS_HELP = "Fusion weight per cloud, e.g. aws=0.3,gcp=0.3,azure=0.4 (non-negative, normalised; default: by rows)."
SERVE_HELP = "Without `skyfuse up`: also start the inference servers, place and serve the fused model."
EMULATE_HELP = "Stores in LocalStack S3, fake-gcs-server and Azurite, the bus on Kafka (`make emulators-up kafka-up`)."


@dataclass
class PlanOptions:
    """The command line's training options, as typed; `make_plan` checks them against the fleet."""

    clouds: str | None = None  # comma-separated; None: every configured cloud
    partition: str = "iid"  # METHOD or label-skew:ALPHA
    fusion: str = "auto"
    rounds: int | None = None  # None: the config's, for the strategies that run rounds
    init: str = "random"  # or a .keras file
    seed: int = 0
    quorum_timeout: float | None = None
    weights: str | None = None  # CLOUD=W,...
    shards_per_cloud: int = 1
    model: str | None = None  # FILE.keras or MODULE:FUNCTION


@dataclass
class RunOptions:
    timeout: float = 900.0
    as_json: bool = False
    serve: bool = True
    emulate: bool = False


def parse_partition(text: str) -> tuple[str, float]:
    method, _, alpha = text.partition(":")
    if method not in PARTITIONS:
        fail(f"--partition {text!r}: expected one of iid, stratified, kmeans, label-skew:ALPHA (e.g. label-skew:0.5)")
    try:
        value = float(alpha) if alpha else 0.5
    except ValueError:
        fail(f"--partition {text!r}: ALPHA must be a number, e.g. label-skew:0.5")
    if value <= 0:
        fail(f"--partition {text!r}: ALPHA must be > 0 (smaller is more skewed)")
    return method, value


def make_plan(fleet: Fleet, dataset: Dataset, options: PlanOptions) -> training.Plan:
    """The training plan from the command line's options, or a usage error saying what to change."""
    method, alpha = parse_partition(options.partition)
    if options.fusion not in FUSIONS:
        fail(f"--fusion {options.fusion!r}: expected one of {', '.join(FUSIONS)}")
    if options.init != "random" and not Path(options.init).is_file():
        fail(f"--init {options.init!r}: expected 'random' or the path of a .keras model file")
    clouds = options.clouds
    chosen = [c.strip() for c in clouds.split(",") if c.strip()] if clouds else list(fleet.clouds)
    unknown = [c for c in chosen if c not in fleet.clouds]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        fail(f"--clouds {clouds!r}: name each configured cloud at most once; configured: {', '.join(fleet.clouds)}")
    weights = None
    if options.weights is not None:
        weights = training.parse_weights(options.weights)
        training.check_weights(weights, chosen)
    in_rounds = options.fusion in ("auto", *federated.SERVER_STRATEGIES)
    rounds = options.rounds or (fleet.training.rounds if in_rounds else 1)
    return training.Plan(target=dataset.target, clouds=chosen, partition=method, alpha=alpha, fusion=options.fusion,
                         rounds=rounds, seed=options.seed, init=None if options.init == "random" else options.init,
                         timeout_s=options.quorum_timeout, weights=weights, shards_per_cloud=options.shards_per_cloud,
                         model=options.model)


class _Bars:
    """Progress bars of a run: models trained and exported, rounds fused, placed clouds serving."""

    def __init__(self, shards: int, rounds: int, serving: bool) -> None:
        # redrawn by `show`, which the run calls after every poll (at least 5 times a second), not
        # by a thread of its own besides: that one's ten redraws a second took 5% of the demo's time
        self.live = Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=err, transient=False, auto_refresh=False)
        self.trained = self.live.add_task("models trained", total=shards * rounds)
        self.exported = self.live.add_task("models exported", total=shards * rounds)
        self.fused = self.live.add_task("rounds fused", total=rounds)
        self.serving = self.live.add_task("placed clouds serving", total=None) if serving else None

    def show(self, p: training.Progress) -> None:
        counts = ((self.trained, sum(p.trained.values())), (self.exported, sum(p.exported.values())),
                  (self.fused, p.rounds_fused))
        for task, done in counts:
            if p.fused is not None:  # the rounds may have stopped early (rounds_patience): end the bars there
                self.live.update(task, total=done, completed=done)
            else:
                self.live.update(task, completed=done)
        if self.serving is not None and p.placement:
            self.live.update(self.serving, total=len(p.placed), completed=p.serving)
        self.live.refresh()


def launch(fleet: Fleet, dataset: Dataset, plan: training.Plan, run: RunOptions,
           then: Step | None = None) -> dict[str, Any]:
    """Train, fuse and (with servers) serve on the local fleet; print and save the summary.
    `then(context)` runs while the fleet is still up and returns more of the summary."""
    from skyfuse.dev import emulation, local, runs

    if run.emulate:
        fleet = emulation.apply(fleet)
    local.prepare(fleet)
    prepared = training.prepare(fleet, dataset, plan)
    err.print(f"[bold]{plan.run_id}[/]: {len(dataset)} rows → train {len(prepared.train)} / validation "
              f"{len(prepared.validation)} / test {len(prepared.test)}; {len(prepared.shards)} shards "
              f"({plan.partition}) placed in {', '.join(plan.clouds)}; "
              f"fusion {plan.fusion}, up to {plan.rounds} round(s)",
              highlight=False)
    bus = ready_bus(fleet)
    bars = _Bars(len(prepared.shard_events), plan.rounds, runs.serves_here(run.serve))
    try:
        summary = runs.run(fleet, bus, prepared, serve=run.serve, timeout_s=run.timeout, show=bars.show, console=err,
                           then=then, following=bars.live)
    finally:
        bus.close()
    path = training.save(summary)
    if run.as_json:
        print(orjson.dumps(summary).decode())
    else:
        print_summary(summary)
        out.print(f"[dim]saved {path}; `skyfuse report` draws it[/]", highlight=False)
    return summary
