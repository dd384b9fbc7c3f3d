"""Fusion speed: the fused ONNX graph against running its K members separately and combining their
outputs in numpy (`fusion.combine`, the project's reference), both on onnxruntime with one
intra-op thread as serving runs it; and how the fused graph's latency grows with K.

Members are the bench's MLP (30 features → 32 → 16 → 2 classes), one seed each, weighted 1..K as
the fuser weights members by their rows. The headline is K = 3 (one member per cloud).
"""
from __future__ import annotations

import timeit

import numpy as np

import harness  # puts the project's modules on sys.path
from skyfuse.ml import fusion
from skyfuse.serving.testing import classifier

STRATEGIES = ("wavg", "vote", "confidence")  # the ensembles the fuser builds (fedavg is one plain member graph)
HEADLINE_K = 3
GROWTH_K, SMOKE_GROWTH_K = (3, 30, 300), (3, 30)
BATCHES = (1, 1024)
ROUNDS = 7  # interleaved rounds; each side keeps its best, so a burst of load on the shared cores hits both


def members(k: int) -> list[bytes]:
    return [classifier(width=30, classes=("a", "b"), hidden=(32, 16), seed=seed) for seed in range(k)]


def best_us(fns: dict[str, callable], seconds: float) -> dict[str, float]:
    """µs per call of each function: best of ROUNDS rounds that take turns, about `seconds` in all."""
    calls = {}
    for name, fn in fns.items():
        once = min(timeit.Timer(fn).repeat(repeat=3, number=1))  # also warms the session up
        calls[name] = max(1, int(seconds / ROUNDS / len(fns) / once))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            best[name] = min(best[name], timeit.Timer(fn).timeit(calls[name]) / calls[name] * 1e6)
    return best


def fused_and_separate(strategy: str, models: list[bytes], X: np.ndarray):
    """(fused run, separate runs + numpy combine), checked to agree before they are timed."""
    weights = list(range(1, len(models) + 1))
    fused = fusion.Session(fusion.fuse(strategy, models, weights))
    sessions = [fusion.Session(m) for m in models]

    def separate():
        return fusion.combine(strategy, [s.run(X) for s in sessions], weights)

    gap = float(np.abs(fused.run(X) - separate()).max())
    if gap > 1e-4:
        raise AssertionError(f"{strategy}: the fused graph differs from the numpy combination by {gap:g}")
    return (lambda: fused.run(X)), separate


def run(ctx: harness.Context) -> None:
    rng = np.random.default_rng(0)
    inputs = {b: rng.normal(size=(b, 30)).astype(np.float32) for b in BATCHES}
    seconds = ctx.seconds(2.0, 0.05)
    models = members(max(GROWTH_K if not ctx.smoke else SMOKE_GROWTH_K))
    smoke = "smoke run: a few ms per side, not a measurement" if ctx.smoke else ""

    for strategy in STRATEGIES:
        for b in BATCHES:
            ctx.progress(f"fusion: {strategy}, K={HEADLINE_K}, batch {b}")
            fused, separate = fused_and_separate(strategy, models[:HEADLINE_K], inputs[b])
            us = best_us({"fused": fused, "separate": separate}, seconds)
            note = f"fused {us['fused']:.1f} µs vs separate {us['separate']:.1f} µs per batch"
            ctx.add(f"fused_vs_separate_b{b}", us["fused"] / us["separate"], "x",
                    f"the {HEADLINE_K} members in their own sessions, outputs combined in numpy",
                    subject=f"{strategy}, K={HEADLINE_K}", goal=("<=", 0.6) if b == 1 else None,
                    note="; ".join(filter(None, [note, smoke])))

    sizes = SMOKE_GROWTH_K if ctx.smoke else GROWTH_K
    fused_us, separate_us = {}, {}
    for k in sizes:
        ctx.progress(f"fusion: growth, wavg, K={k}, batch 1")
        fused, separate = fused_and_separate("wavg", models[:k], inputs[1])
        us = best_us({"fused": fused, "separate": separate}, seconds)
        fused_us[k], separate_us[k] = us["fused"], us["separate"]
    note = "wavg, batch 1" + ("; smoke run: K = 3, 30 only" if ctx.smoke else "")
    ctx.growth("fused graph latency", "members K", "µs per batch", list(fused_us.items()), note=note)
    ctx.growth("separate members + numpy combine", "members K", "µs per batch", list(separate_us.items()),
               note=note + "; the fused graph's peer")
    # growth against linear: (t_big / t_small) / (K_big / K_small); <= 1 means no worse than linear
    spans = [(sizes[0], sizes[-1])] + ([(sizes[-2], sizes[-1])] if len(sizes) > 2 else [])
    for small, big in spans:
        linear = big / small
        separate_growth = separate_us[big] / separate_us[small] / linear
        figures = f"wavg, batch 1: {fused_us[small]:.1f} → {fused_us[big]:.1f} µs"
        ctx.add("fused_growth_vs_linear", fused_us[big] / fused_us[small] / linear, "x",
                f"linear growth in K (separate members: {separate_growth:.2f})", subject=f"K {small}→{big}",
                goal=("<=", 1.0), note="; ".join(filter(None, [figures, smoke])))
