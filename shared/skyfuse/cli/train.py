"""`skyfuse train` (any CSV) and `skyfuse demo` (a shipped dataset, or the design's worked example)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from skyfuse.cli.common import FAILURE, Command, app, fail, load_fleet, local_fleet_running
from skyfuse.cli.run import (
    EMULATE_HELP,
    FUSION_HELP,
    PARTITION_HELP,
    SERVE_HELP,
    WEIGHTS_HELP,
    PlanOptions,
    RunOptions,
    launch,
    make_plan,
)

SCENARIOS = ("worked-example",)


@app.command(cls=Command)
def train(
    data: Annotated[Path, typer.Argument(help="CSV file with a header row; every column but the target is a "
                                              "numeric feature.")],
    target: Annotated[str, typer.Option("--target", "-t", help="The label column.")],
    clouds: Annotated[str | None, typer.Option(help="Comma-separated configured clouds, any number (default: "
                                                    "every configured cloud).")] = None,
    shards_per_cloud: Annotated[int, typer.Option("--shards-per-cloud", metavar="N", min=1,
                                                  help="Shards (sub-models) each cloud trains.")] = 1,
    partition: Annotated[str, typer.Option(help=PARTITION_HELP)] = "iid",
    fusion: Annotated[str, typer.Option(help=FUSION_HELP)] = "auto",
    weights: Annotated[str | None, typer.Option(metavar="CLOUD=W,...", help=WEIGHTS_HELP)] = None,
    rounds: Annotated[int | None, typer.Option(help="FedAvg rounds (default from the config).")] = None,
    init: Annotated[str, typer.Option(help="random, or a .keras model to warm-start every trainer from.")] = "random",
    model: Annotated[str | None, typer.Option("--model", metavar="FILE.keras|MODULE:FUNCTION", help="Your own Keras "
                     "model instead of the built-in MLP: a .keras file, or MODULE:FUNCTION (a .py path or importable "
                     "module, then a function returning a compiled model). One input (None, d) of raw features, one "
                     "softmax output (None, k).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split, the partition and the initial weights.")] = 0,
    quorum_timeout: Annotated[float | None, typer.Option(help="Seconds the fuser waits for missing members.")] = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 900.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (last line of stdout) "
                                                         "instead of tables.")] = False,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help=SERVE_HELP)] = True,
    emulate: Annotated[bool, typer.Option("--emulate", help=EMULATE_HELP)] = False,
) -> None:
    """Train on DATA split across clouds, fuse the shard models, and compare with centralized training."""
    from skyfuse.ml import data as mldata

    if not data.is_file():
        fail(f"no such file: {data}")
    try:
        dataset = mldata.load_csv(data.read_bytes(), target)
    except mldata.DataError as exc:
        fail(f"{data}: {exc}")
    fleet = load_fleet()
    plan = make_plan(fleet, dataset, PlanOptions(
        clouds=clouds, partition=partition, fusion=fusion, rounds=rounds, init=init, seed=seed,
        quorum_timeout=quorum_timeout, weights=weights, shards_per_cloud=shards_per_cloud, model=model))
    launch(fleet, dataset, plan, RunOptions(timeout=timeout, as_json=as_json, serve=serve, emulate=emulate))


@app.command(cls=Command)
def demo(
    dataset: Annotated[str, typer.Option(
        help="breast_cancer or digits (scikit-learn's, shipped with it).")] = "breast_cancer",
    partition: Annotated[str, typer.Option(help=PARTITION_HELP)] = "iid",
    fusion: Annotated[str, typer.Option(help=FUSION_HELP)] = "auto",
    rounds: Annotated[int | None, typer.Option(help="FedAvg rounds (default from the config).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    scenario: Annotated[str | None, typer.Option(metavar="NAME", help="worked-example: the design's example end to "
                        "end (3 × 1000 rows, N(0, 1) init, 10 GD steps, fusion 0.3/0.3/0.4, then a load step that "
                        "moves serving by response time).")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help=SERVE_HELP)] = True,
    emulate: Annotated[bool, typer.Option("--emulate", help=EMULATE_HELP)] = False,
) -> None:
    """The whole training half on a real dataset over three clouds: what `make run` runs."""
    from skyfuse.ml import data as mldata

    run = RunOptions(as_json=as_json, serve=serve, emulate=emulate)
    if scenario is not None:
        worked_example(scenario, seed, run)
        return
    if dataset not in ("breast_cancer", "digits"):
        fail(f"--dataset {dataset!r}: expected breast_cancer or digits")
    fleet = load_fleet()
    ds = mldata.sample_dataset(dataset)
    launch(fleet, ds, make_plan(fleet, ds, PlanOptions(partition=partition, fusion=fusion, rounds=rounds, seed=seed)),
           run)


def worked_example(scenario: str, seed: int, run: RunOptions) -> None:
    """`demo --scenario worked-example`: its own fleet and timings, then the load step that moves serving."""
    from skyfuse.dev import scenarios

    if scenario not in SCENARIOS:
        fail(f"--scenario {scenario!r}: expected one of {', '.join(SCENARIOS)}")
    if not run.serve:
        fail("--scenario worked-example moves serving between clouds: it needs the inference servers (drop --no-serve)")
    if local_fleet_running():
        fail("--scenario worked-example starts its own fleet with its own timings; stop `skyfuse up` first", FAILURE)
    scenarios.prepare_environment(list(load_fleet().clouds))  # before the fleet loads: all its processes see it
    fleet = load_fleet()
    data, plan = scenarios.worked_example(list(fleet.clouds), seed)
    summary = launch(fleet, data, plan, run, then=scenarios.load_step)
    if not summary["scenario"]["moved"]:
        fail(f"the load step did not move serving: {summary['scenario']['error']}", FAILURE)
