"""Fusion quality benchmark (a script, not a test): does fusing per-cloud sub-models come close to
training one model on all the data?

For each scenario and seed: split the dataset into train/validation/test (test is never used to
train or to choose), partition train into shards, train one model per shard (round 0), fuse them
with wavg (weights = shard rows), vote and confidence, and run the server strategies as the fuser
does (skyfuse.ml.federated): round 0's mean as the warm start, then R rounds in which every shard
fine-tunes the global model and the strategy makes the next one. Each of fedavg, fedprox (clients
with the proximal term), fedadam and fedyogi runs its own trajectory, as `--fusion <it>` would;
`chosen` is what `--fusion auto` picks: the ensembles and one trajectory whose server step (fedavg,
fedadam or fedyogi) is chosen on validation each round, the best on VALIDATION over all rounds.
Every strategy reports the TEST accuracy of its best validation round. Centralized: the same model
trained on all training rows.

    .venv/bin/python bench/fusion_quality.py                # every scenario, 5 seeds
    .venv/bin/python bench/fusion_quality.py --seeds 2 --scenarios synth-iid5 --strategies fedavg fedadam

Targets: breast cancer IID: chosen >= mean shard and >= centralized - 2 points; label skew
alpha=0.5 (breast cancer and digits): chosen >= centralized - 2 points; five IID shards of the
30,000-row synthetic set, and digits under label skew alpha=0.3: chosen >= centralized - 1 point.
The synthetic set in five shards under label skew alpha=0.3 is measured without a target.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))

import numpy as np  # noqa: E402

from skyfuse.config import Training  # noqa: E402
from skyfuse.ml import data as D  # noqa: E402
from skyfuse.ml import export as E  # noqa: E402
from skyfuse.ml import federated as FL  # noqa: E402
from skyfuse.ml import fusion as F  # noqa: E402
from skyfuse.ml import model as M  # noqa: E402


@dataclass(frozen=True)
class Scenario:
    dataset: str
    partition: str
    alpha: float
    shards: int
    target: str  # "iid" | "skew" (within 2 points) | "close" (within 1 point) | "report" (none)


SCENARIOS = {
    "cancer-iid": Scenario("breast_cancer", "iid", 0.5, 3, "iid"),
    "cancer-skew": Scenario("breast_cancer", "label-skew", 0.5, 3, "skew"),
    "digits-skew": Scenario("digits", "label-skew", 0.5, 3, "skew"),
    "synth-iid5": Scenario("synth", "iid", 0.5, 5, "close"),
    "digits-skew03": Scenario("digits", "label-skew", 0.3, 3, "close"),
    # five shards over three classes at alpha=0.3 leave most shards with one or two classes: no
    # strategy here comes within a few points of centralized (measured, as the limit of these methods)
    "synth-skew03": Scenario("synth", "label-skew", 0.3, 5, "report"),
}
TRAJECTORIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
# when validation accuracies tie, prefer the earlier strategy (as the fuser does)
PREFERENCE = ("fedavg", "fedprox", "fedadam", "fedyogi", "wavg", "confidence", "vote")


def synthetic() -> D.Dataset:
    """30,000 rows, 20 features (8 informative, 4 redundant), 3 classes (scikit-learn's
    make_classification, fixed random state): the multi-class case with many rows."""
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=30_000, n_features=20, n_informative=8, n_redundant=4, n_classes=3,
                               random_state=0)
    return D.Dataset(X, y, [f"x{i}" for i in range(20)], [0, 1, 2], "label", "synth")


def dataset(name: str) -> D.Dataset:
    return synthetic() if name == "synth" else D.sample_dataset(name)


@dataclass
class Defaults:
    """The product defaults this benchmark tunes (`[training]` in skyfuse.toml)."""
    spec: M.ModelSpec = field(default_factory=M.ModelSpec)
    rounds: int = Training().rounds - 1  # fine-tuning rounds after round 0 (the fleet's rounds count round 0)
    finetune_epochs: int = Training().finetune_epochs
    finetune_learning_rate: float = Training().finetune_learning_rate
    finetune_optimizer: str = Training().finetune_optimizer
    finetune_early_stopping: bool = False  # the trainer runs every fine-tuning epoch; on: as before
    finetune_decay: float = Training().finetune_lr_decay
    server: dict = field(default_factory=lambda: {
        "eta": Training().server_lr, "tau": Training().server_tau, "beta_1": Training().server_beta1,
        "beta_2": Training().server_beta2, "proximal_mu": Training().proximal_mu})
    trajectories: tuple = TRAJECTORIES + ("auto",)


def _accuracy(model, ds: D.Dataset) -> float:
    return float(np.mean(M.predict_proba(model, ds.X).argmax(1) == ds.y))


def trajectory(kinds: tuple[str, ...], members: list, shards: list, k: int, spec: M.ModelSpec, cfg: Defaults,
               validation: D.Dataset, test: D.Dataset) -> dict[str, dict]:
    """One trajectory of global models driven by the server strategies `kinds` (one, or several with
    the step chosen on validation each round, as auto): {strategy: best round's val, test, round}."""
    strategies = [FL.strategy(s, **cfg.server) for s in kinds]
    samples = [r.samples for r in members]
    states = FL.round_states(strategies, None, [r.model.get_weights() for r in members], samples)
    model = M.from_bytes(M.to_bytes(members[0].model))  # a model of the architecture, weights set below
    best: dict[str, dict] = {}

    def score(round_: int, shown) -> str:
        scored = {}
        for s in shown:
            model.set_weights(states[s]["global"])
            scored[s] = (_accuracy(model, validation), _accuracy(model, test))
            if s not in best or scored[s][0] > best[s]["val"]:
                best[s] = {"val": scored[s][0], "test": scored[s][1], "round": round_}
        return max(scored, key=lambda s: (scored[s][0], -kinds.index(s)))

    chosen = score(0, kinds[:1])
    mu = cfg.server["proximal_mu"] if kinds == ("fedprox",) else 0.0
    tune = M.ModelSpec.from_dict({**spec.to_dict(), "proximal_mu": mu, "early_stopping": cfg.finetune_early_stopping,
                                  "learning_rate": cfg.finetune_learning_rate, "optimizer": cfg.finetune_optimizer})
    for r in range(1, cfg.rounds + 1):
        states = FL.follow(states, chosen)
        model.set_weights(states[chosen]["global"])
        decayed = tune.learning_rate * cfg.finetune_decay ** (r - 1)  # as the trainer does
        round_spec = M.ModelSpec.from_dict({**tune.to_dict(), "learning_rate": decayed})
        tuned = [M.train(round_spec, s, k, initial=model, epochs=cfg.finetune_epochs) for s in shards]
        states = FL.round_states(strategies, states, [x.model.get_weights() for x in tuned], [x.samples for x in tuned])
        chosen = score(r, kinds)
    return best


def run_case(scenario: Scenario, seed: int, cfg: Defaults) -> dict:
    ds = dataset(scenario.dataset)
    train, validation, test = D.split(ds, validation=0.15, test=0.2, seed=seed)
    shards = D.partition(train, scenario.shards, scenario.partition, seed=seed, alpha=scenario.alpha)
    k = ds.n_classes
    spec = M.ModelSpec.from_dict({**cfg.spec.to_dict(), "seed": seed})
    pooled = D.pooled_stats([s.summary() for s in shards])
    timing = {}

    # a shard the trainer refuses (e.g. rows of one class only, common under label skew) gives no
    # member, as in the product; the others are fused
    usable = []
    for s in shards:
        try:
            M.check_shard(s, k)
            usable.append(s)
        except M.TrainingError:
            pass
    skipped = len(shards) - len(usable)
    shards = usable

    t = time.perf_counter()
    members = [M.train(spec, s, k, stats=pooled) for s in shards]
    onnx_members = [E.to_onnx(r.model) for r in members]
    samples = [r.samples for r in members]
    timing["members"] = time.perf_counter() - t

    val, tst = {}, {}
    for s in FL.ENSEMBLES:
        fused = F.fuse(s, onnx_members, samples)
        val[s], tst[s] = F.accuracy(fused, validation), F.accuracy(fused, test)
    for kind in cfg.trajectories:
        t = time.perf_counter()
        kinds = FL.AUTO_SERVER if kind == "auto" else (kind,)
        best = trajectory(kinds, members, shards, k, spec, cfg, validation, test)
        for s, b in best.items():
            name = f"auto.{s}" if kind == "auto" else s
            val[name], tst[name] = b["val"], b["test"]
        timing[kind] = time.perf_counter() - t
    # auto's choice: the ensembles and auto's own trajectory (or, without one, the plain fedavg one)
    own = [s for s in val if s.startswith("auto.")] or [s for s in ("fedavg",) if s in val]
    candidates = list(FL.ENSEMBLES) + own
    chosen = max(candidates, key=lambda s: (val[s], -PREFERENCE.index(s.removeprefix("auto."))))

    t = time.perf_counter()
    central = M.train(spec, train, k)
    timing["central"] = time.perf_counter() - t

    return {"seed": seed, "shard_rows": [len(s) for s in shards] + ["refused"] * skipped,
            "shard": float(np.mean([F.accuracy(b, test) for b in onnx_members])),
            **{s: tst[s] for s in tst if not s.startswith("auto.")}, "chosen": tst[chosen], "chosen_strategy": chosen,
            "central": _accuracy(central.model, test), "validation": val, "test": tst, "seconds": timing}


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}"


def columns(rows: list[dict]) -> list[str]:
    present = [c for c in ("wavg", "vote", "confidence") + TRAJECTORIES if c in rows[0]]
    return ["shard"] + present + ["chosen", "central"]


def report(name: str, rows: list[dict]) -> dict:
    sc = SCENARIOS[name]
    print(f"\n{name}  ({sc.dataset}, {sc.shards} shards, {sc.partition}"
          + (f" alpha={sc.alpha}" if sc.partition == "label-skew" else "") + ")")
    cols = columns(rows)
    print("  seed  " + "  ".join(f"{c:>10}" for c in cols) + "  chosen strategy   shard rows")
    for r in rows:
        print(f"  {r['seed']:>4}  " + "  ".join(f"{_pct(r[c]):>10}" for c in cols)
              + f"  {r['chosen_strategy']:<16}  {r['shard_rows']}")
    summary = {c: (float(np.mean([r[c] for r in rows])), float(np.std([r[c] for r in rows]))) for c in cols}
    print("  mean  " + "  ".join(f"{_pct(m)}±{100 * s:3.1f}" for m, s in summary.values()))
    central = summary["central"][0]
    print("  gap   " + "  ".join(f"{100 * (m - central):+10.1f}" for m, _ in summary.values()))
    return summary


def check(name: str, s: dict) -> list[str]:
    chosen, central, shard = s["chosen"][0], s["central"][0], s["shard"][0]
    target = SCENARIOS[name].target
    problems = []
    if target == "report":
        return problems
    if target == "iid" and chosen < shard:
        problems.append(f"{name}: chosen {100 * chosen:.1f} < mean shard {100 * shard:.1f}")
    allowed = 0.01 if target == "close" else 0.02
    if chosen < central - allowed:
        problems.append(f"{name}: chosen {100 * chosen:.1f} < centralized {100 * central:.1f} "
                        f"- {100 * allowed:.0f} point(s)")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--strategies", nargs="+", choices=TRAJECTORIES + ("auto",),
                   help="server-strategy trajectories to run (default: all, and auto's)")
    p.add_argument("--hidden", type=int, nargs="+")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--rounds", type=int, help="fine-tuning rounds after round 0")
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--finetune-learning-rate", type=float)
    p.add_argument("--finetune-early-stopping", choices=("on", "off"))
    p.add_argument("--finetune-optimizer", choices=M.OPTIMIZERS)
    p.add_argument("--finetune-decay", type=float)
    for key in ("eta", "tau", "beta_1", "beta_2", "proximal_mu"):
        p.add_argument(f"--{key.replace('_', '-')}", type=float, dest=key)
    p.add_argument("--json", type=Path, help="also write every result to this file")
    a = p.parse_args(argv)

    cfg = Defaults()
    spec = cfg.spec.to_dict()
    for key, value in (("hidden", a.hidden), ("epochs", a.epochs), ("batch_size", a.batch_size),
                       ("learning_rate", a.learning_rate)):
        if value is not None:
            spec[key] = value
    cfg.spec = M.ModelSpec.from_dict(spec)
    cfg.rounds = cfg.rounds if a.rounds is None else a.rounds
    cfg.finetune_epochs = a.finetune_epochs or cfg.finetune_epochs
    cfg.finetune_learning_rate = a.finetune_learning_rate or cfg.finetune_learning_rate
    cfg.finetune_optimizer = a.finetune_optimizer or cfg.finetune_optimizer
    cfg.finetune_decay = a.finetune_decay or cfg.finetune_decay
    if a.finetune_early_stopping:
        cfg.finetune_early_stopping = a.finetune_early_stopping == "on"
    cfg.server.update({k: getattr(a, k) for k in cfg.server if getattr(a, k) is not None})
    cfg.trajectories = tuple(a.strategies) if a.strategies else cfg.trajectories
    print(f"defaults: spec {cfg.spec.to_dict()} (seed = run seed), {cfg.rounds} rounds x {cfg.finetune_epochs} "
          f"fine-tune epochs ({cfg.finetune_optimizer}, learning rate {cfg.finetune_learning_rate} x "
          f"{cfg.finetune_decay}^(round-1), early stopping {'on' if cfg.finetune_early_stopping else 'off'}) "
          f"after round 0, server {cfg.server}, trajectories {', '.join(cfg.trajectories)}")

    started = time.perf_counter()
    results, problems = {}, []
    for name in a.scenarios:
        rows = []
        for seed in range(a.seeds):
            rows.append(run_case(SCENARIOS[name], seed, cfg))
            print(f"  [{name} seed {seed}: {sum(rows[-1]['seconds'].values()):.1f}s "
                  + ", ".join(f"{k} {v:.1f}s" for k, v in rows[-1]["seconds"].items()) + "]", flush=True)
        summary = report(name, rows)
        results[name] = {"rows": rows, "summary": summary}
        problems += check(name, summary)
    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.0f}s on {os.cpu_count()} cores")
    if a.json:
        a.json.write_text(json.dumps({"defaults": {**cfg.spec.to_dict(), "rounds": cfg.rounds,
                                                   "finetune_epochs": cfg.finetune_epochs, "server": cfg.server},
                                      "results": results, "wall_seconds": wall}, indent=1))
    if problems:
        print("TARGETS MISSED:\n  " + "\n  ".join(problems))
        return 1
    print("all targets met" if a.seeds >= 5 and len(a.scenarios) == len(SCENARIOS) else "targets met (partial run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
