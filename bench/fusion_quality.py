"""Fusion quality benchmark (a script, not a test): does fusing per-cloud sub-models come close to
training one model on all the data?

For each scenario and seed: split the dataset into train/validation/test (test is never used to
train or to choose), partition train into shards, train one model per shard, fuse them with
wavg (weights = shard rows), vote, confidence and FedAvg (R rounds), choose the strategy with the
best VALIDATION accuracy, and train the centralized model on all training rows. Reports TEST
accuracy per seed and mean +- std over seeds: mean shard model, each strategy, the chosen one,
centralized.

    .venv/bin/python bench/fusion_quality.py                # the three scenarios, 5 seeds
    .venv/bin/python bench/fusion_quality.py --seeds 2 --scenarios cancer-iid

Targets: breast cancer IID: chosen >= mean shard and >= centralized - 2 points; label skew
alpha=0.5 (breast cancer and digits): chosen >= centralized - 2 points.
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

from skyfuse.ml import data as D  # noqa: E402
from skyfuse.ml import export as E  # noqa: E402
from skyfuse.ml import fusion as F  # noqa: E402
from skyfuse.ml import model as M  # noqa: E402

SCENARIOS = {  # name: (dataset, partition, alpha, target)
    "cancer-iid": ("breast_cancer", "iid", 0.5, "iid"),
    "cancer-skew": ("breast_cancer", "label-skew", 0.5, "skew"),
    "digits-skew": ("digits", "label-skew", 0.5, "skew"),
}
# when validation accuracies tie, prefer the earlier strategy
PREFERENCE = ("fedavg", "wavg", "confidence", "vote")


@dataclass
class Defaults:
    """The product defaults this benchmark tunes."""
    spec: M.ModelSpec = field(default_factory=M.ModelSpec)
    shards: int = 3
    rounds: int = M.FEDAVG_ROUNDS  # FedAvg rounds after round 0
    finetune_epochs: int = M.FINETUNE_EPOCHS
    round0_epochs: int | None = None  # epochs of FedAvg's round 0 (None: spec.epochs, like the members)
    pooled_members: bool = True  # ensemble members standardize with the pooled statistics too
    vote_weights: str = "samples"  # "samples" or "equal"


def run_case(dataset: str, method: str, alpha: float, seed: int, cfg: Defaults) -> dict:
    ds = D.sample_dataset(dataset)
    train, validation, test = D.split(ds, validation=0.15, test=0.2, seed=seed)
    shards = D.partition(train, cfg.shards, method, seed=seed, alpha=alpha)
    k = ds.n_classes
    spec = M.ModelSpec(**{**cfg.spec.to_dict(), "seed": seed})
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
    members = [M.train(spec, s, k, stats=pooled if cfg.pooled_members else None) for s in shards]
    onnx_members = [E.to_onnx(r.model) for r in members]
    samples = [r.samples for r in members]
    timing["members"] = time.perf_counter() - t

    fused = {"wavg": F.fuse("wavg", onnx_members, samples),
             "vote": F.fuse("vote", onnx_members, samples if cfg.vote_weights == "samples" else None),
             "confidence": F.fuse("confidence", onnx_members, samples)}

    t = time.perf_counter()
    if cfg.pooled_members and cfg.round0_epochs is None:
        fed_members = onnx_members  # round 0 of FedAvg is exactly these members: same seed, pooled statistics
    else:
        fed_members = [E.to_onnx(M.train(spec, s, k, stats=pooled, epochs=cfg.round0_epochs).model) for s in shards]
    global_onnx = F.fuse("fedavg", fed_members, samples, lineage={"round": 0})
    fed_curve = [F.accuracy(global_onnx, validation)]
    for r in range(1, cfg.rounds + 1):
        initial = M.from_onnx(global_onnx)
        tuned = [M.train(spec, s, k, initial=initial, epochs=cfg.finetune_epochs) for s in shards]
        global_onnx = F.fuse("fedavg", [E.to_onnx(x.model) for x in tuned], [x.samples for x in tuned],
                             lineage={"round": r})
        fed_curve.append(F.accuracy(global_onnx, validation))
    fused["fedavg"] = global_onnx
    timing["fedavg"] = time.perf_counter() - t

    val = {s: F.accuracy(b, validation) for s, b in fused.items()}
    chosen = max(PREFERENCE, key=lambda s: (val[s], -PREFERENCE.index(s)))
    tst = {s: F.accuracy(b, test) for s, b in fused.items()}

    t = time.perf_counter()
    central = M.train(spec, train, k)
    timing["central"] = time.perf_counter() - t
    central_acc = float(np.mean(M.predict_proba(central.model, test.X).argmax(1) == test.y))

    return {"seed": seed, "shard_rows": [len(s) for s in shards] + ["refused"] * skipped,
            "shard": float(np.mean([F.accuracy(b, test) for b in onnx_members])),
            **tst, "chosen": tst[chosen], "chosen_strategy": chosen, "central": central_acc,
            "validation": val, "fedavg_validation_by_round": fed_curve, "seconds": timing}


COLUMNS = ("shard", "wavg", "vote", "confidence", "fedavg", "chosen", "central")


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}"


def report(name: str, rows: list[dict]) -> dict:
    print(f"\n{name}  ({SCENARIOS[name][0]}, {SCENARIOS[name][1]}"
          + (f" alpha={SCENARIOS[name][2]}" if SCENARIOS[name][1] == "label-skew" else "") + ")")
    print("  seed  " + "  ".join(f"{c:>10}" for c in COLUMNS) + "  chosen strategy   shard rows")
    for r in rows:
        print(f"  {r['seed']:>4}  " + "  ".join(f"{_pct(r[c]):>10}" for c in COLUMNS)
              + f"  {r['chosen_strategy']:<16}  {r['shard_rows']}")
    summary = {c: (float(np.mean([r[c] for r in rows])), float(np.std([r[c] for r in rows]))) for c in COLUMNS}
    print("  mean  " + "  ".join(f"{_pct(m)}±{100 * s:3.1f}" for m, s in summary.values()))
    return summary


def check(name: str, s: dict) -> list[str]:
    chosen, central, shard = s["chosen"][0], s["central"][0], s["shard"][0]
    problems = []
    if SCENARIOS[name][3] == "iid":
        if chosen < shard:
            problems.append(f"{name}: chosen {100 * chosen:.1f} < mean shard {100 * shard:.1f}")
    if chosen < central - 0.02:
        problems.append(f"{name}: chosen {100 * chosen:.1f} < centralized {100 * central:.1f} - 2 points")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--hidden", type=int, nargs="+")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--rounds", type=int)
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--round0-epochs", type=int)
    p.add_argument("--own-stats", action="store_true", help="ensemble members standardize with their own shard")
    p.add_argument("--vote-weights", choices=("samples", "equal"))
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
    cfg.round0_epochs = a.round0_epochs or cfg.round0_epochs
    cfg.pooled_members = not a.own_stats
    cfg.vote_weights = a.vote_weights or cfg.vote_weights
    print(f"defaults: spec {cfg.spec.to_dict()} (seed = run seed), {cfg.shards} shards, FedAvg rounds "
          f"{cfg.rounds} x {cfg.finetune_epochs} fine-tune epochs, members standardize with "
          f"{'pooled' if cfg.pooled_members else 'their own'} statistics, vote weights {cfg.vote_weights}")

    started = time.perf_counter()
    results, problems = {}, []
    for name in a.scenarios:
        dataset, method, alpha, _ = SCENARIOS[name]
        rows = []
        for seed in range(a.seeds):
            rows.append(run_case(dataset, method, alpha, seed, cfg))
            print(f"  [{name} seed {seed}: {sum(rows[-1]['seconds'].values()):.1f}s "
                  + ", ".join(f"{k} {v:.1f}s" for k, v in rows[-1]["seconds"].items()) + "]", flush=True)
        summary = report(name, rows)
        results[name] = {"rows": rows, "summary": summary}
        problems += check(name, summary)
    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.0f}s on {os.cpu_count()} cores")
    if a.json:
        a.json.write_text(json.dumps({"defaults": {**cfg.spec.to_dict(), "rounds": cfg.rounds,
                                                   "finetune_epochs": cfg.finetune_epochs},
                                      "results": results, "wall_seconds": wall}, indent=1))
    if problems:
        print("TARGETS MISSED:\n  " + "\n  ".join(problems))
        return 1
    print("all targets met" if a.seeds >= 5 and len(a.scenarios) == len(SCENARIOS) else "targets met (partial run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
