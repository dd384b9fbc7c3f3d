"""The per-cloud sub-model: a small Keras MLP that takes raw features and outputs class
probabilities, with its standardization built in (so the exported ONNX model takes raw features).

    features (None, d) -> standardize (fixed mean/variance) -> dense_0 .. dense_{h-1} (relu)
                       -> out (softmax, k units; 2 for binary) -> (None, k)

Every layer has a fixed name, and initial weights come from seeded initializers, so two models of
the same spec have the same weight names (and ONNX initializer names) and, with the same seed,
the same initial weights: what FedAvg needs.

A user's own model (`load_user_model`: a .keras file or MODULE:FUNCTION, checked by
`check_user_model`) can stand in for the MLP: `train(..., template=model)` trains it with the same
loop. It gets the raw features (no built-in standardization) and must output class probabilities.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import io
import logging
import os
import tempfile
import threading
import time
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from skyfuse.errors import InvalidInput

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import keras  # noqa: E402  (after the environment settings above)

from . import compiled  # noqa: E402
from .data import Dataset, pooled_stats  # noqa: E402,F401  (pooled_stats is part of this module's API)

Tensor = Any  # a Keras/TensorFlow tensor (TensorFlow and Keras ship no types)
WarmKey = tuple[str, int, str, bool]  # architecture, classes, training settings, proximal term

MODEL_NAME = "skyfuse_mlp"
STANDARDIZE = "standardize"
MIN_ROWS = 5
PATIENCE = 10
# The federated schedule (rounds, fine-tuning epochs, optimizer and learning rate) is the fleet's
# `[training]` config, tuned by bench/fusion_quality.py.


class _NoRetracingNoise(logging.Filter):
    """Each `train` compiles fresh tf.functions for its fresh model, which TensorFlow reports as
    'retracing' after a few calls; that is expected here, so drop just that message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


logging.getLogger("tensorflow").addFilter(_NoRetracingNoise())


class TrainingError(InvalidInput):
    """A shard that cannot be trained on; the message says why."""


OPTIMIZERS = ("adam", "sgd")
INITIALIZERS = ("glorot", "normal")


@dataclass
class ModelSpec:
    """How a shard model is built and trained. The defaults are the ones bench/fusion_quality.py
    tuned (breast cancer IID and label skew, digits label skew; 3 shards, 5 seeds).

    `optimizer`: `adam`, or `sgd` (plain gradient descent, no momentum); a `batch_size` of at least
    the shard's rows means full-batch steps (one step an epoch). `init`: `glorot` (Glorot-uniform
    kernels, zero biases) or `normal` (every kernel and bias drawn from N(0, 1)); seeded either way.
    `early_stopping`: stop after PATIENCE epochs without a better validation loss and keep the best
    weights; off, exactly `epochs` epochs run and the last weights are kept. `proximal_mu`: FedProx's
    mu/2 ||w - w_global||^2 added to the loss while fine-tuning from a global model (0: off)."""
    hidden: tuple[int, ...] = (64, 32)
    epochs: int = 100  # at most; early stopping (PATIENCE epochs on validation loss) usually ends sooner
    batch_size: int = 16
    learning_rate: float = 2e-3
    seed: int = 0
    optimizer: str = "adam"
    init: str = "glorot"
    early_stopping: bool = True
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden layer sizes must be positive, got {self.hidden}")
        self.epochs, self.batch_size, self.seed = int(self.epochs), int(self.batch_size), int(self.seed)
        self.learning_rate = float(self.learning_rate)
        if self.epochs < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise ValueError("epochs and batch_size must be >= 1 and learning_rate > 0")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.init not in INITIALIZERS:
            raise ValueError(f"init {self.init!r} is not one of {', '.join(INITIALIZERS)}")
        if not isinstance(self.early_stopping, (bool, np.bool_)):
            raise ValueError(f"early_stopping must be true or false, got {self.early_stopping!r}")
        self.early_stopping = bool(self.early_stopping)
        self.proximal_mu = float(self.proximal_mu)
        if not (np.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ValueError(f"proximal_mu must be a finite number >= 0, got {self.proximal_mu}")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, defaults: Mapping[str, Any] | None = None) -> ModelSpec:
        """The spec of `d`; keys it leaves out come from `defaults` (keys `d` may not have are
        ignored there, e.g. a fleet's other training settings), then from the class."""
        d = dict(d or {})
        known = set(cls.keys())
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model spec keys {unknown}; known: {sorted(known)}")
        return cls(**{**{k: v for k, v in (defaults or {}).items() if k in known}, **d})

    def to_dict(self) -> dict[str, Any]:
        return {"hidden": list(self.hidden), "epochs": self.epochs, "batch_size": self.batch_size,
                "learning_rate": self.learning_rate, "seed": self.seed, "optimizer": self.optimizer,
                "init": self.init, "early_stopping": self.early_stopping, "proximal_mu": self.proximal_mu}


@dataclass
class TrainResult:
    model: keras.Model
    samples: int  # rows of the shard (training + validation): the member's FedAvg / wavg weight
    validation: dict[str, float | None] = field(default_factory=dict)  # rows, accuracy, loss (None when no rows)
    seconds: float = 0.0
    epochs: int = 0  # epochs run (early stopping may end before spec.epochs)
    validation_rows: Dataset | None = None  # the shard rows held out for validation (may be empty)


@keras.saving.register_keras_serializable(package="skyfuse")
class Standardize(keras.layers.Layer):  # type: ignore[misc]  # Keras ships no types: Layer is Any
    """(x - mean) / sqrt(variance) with fixed (non-trainable) mean and variance weights.

    Weights rather than constants, so they are frozen into ONNX initializers, travel with
    get_weights/set_weights (fine-tuning keeps them) and are saved in the .keras file."""

    def __init__(self, mean: ArrayLike | None = None, variance: ArrayLike | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._init_mean = None if mean is None else np.asarray(mean, dtype=np.float32)
        self._init_variance = None if variance is None else np.asarray(variance, dtype=np.float32)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        if input_shape[-1] is None:  # one mean and variance per feature: the count must be known
            raise TypeError(f"Standardize needs a fixed number of features, got input shape {input_shape}")
        d = int(input_shape[-1])
        mean = self._init_mean if self._init_mean is not None else np.zeros(d, np.float32)
        variance = self._init_variance if self._init_variance is not None else np.ones(d, np.float32)
        self.mean = self.add_weight(name="mean", shape=(d,), trainable=False,
                                    initializer=keras.initializers.Constant(mean))
        self.variance = self.add_weight(name="variance", shape=(d,), trainable=False,
                                        initializer=keras.initializers.Constant(variance))

    def call(self, inputs: Tensor) -> Tensor:
        return (inputs - self.mean) / keras.ops.sqrt(self.variance)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()  # mean and variance are weights: saved and loaded with them
        return config


def _set_standardization(model: keras.Model, mean: ArrayLike, variance: ArrayLike) -> None:
    """Set a built model's standardization, as `build` does (zero or non-finite variance as 1)."""
    layer = model.get_layer(STANDARDIZE)
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    if mean.shape != tuple(layer.mean.shape) or np.asarray(variance).reshape(-1).shape != mean.shape:
        raise ValueError(f"mean and variance must have {layer.mean.shape[0]} values each")
    layer.mean.assign(mean.astype(np.float32))
    layer.variance.assign(_safe_variance(np.asarray(variance).reshape(-1)).astype(np.float32))


def _safe_variance(variance: ArrayLike) -> np.ndarray:
    v = np.asarray(variance, dtype=np.float64)
    return np.where(np.isfinite(v) & (v > 1e-12), v, 1.0)


def build(spec: ModelSpec, n_features: int, n_classes: int, mean: ArrayLike, variance: ArrayLike) -> keras.Model:
    """The model for `spec`, with a fixed standardization (x - mean) / sqrt(variance); zero (or
    non-finite) variance is taken as 1 so constant features pass through centred."""
    if n_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
    inputs = keras.Input(shape=(n_features,), dtype="float32", name="features")
    x = Standardize(name=STANDARDIZE)(inputs)
    for i, units in enumerate(spec.hidden):
        x = keras.layers.Dense(units, activation="relu", name=f"dense_{i}",
                               **_initializers(spec, spec.seed * 1009 + i))(x)
    out = keras.layers.Dense(n_classes, activation="softmax", name="out",
                             **_initializers(spec, spec.seed * 1009 + 1000))(x)
    model = keras.Model(inputs, out, name=MODEL_NAME)
    _set_standardization(model, mean, variance)
    return model


def _initializers(spec: ModelSpec, seed: int) -> dict[str, Any]:
    """A dense layer's seeded initializers: Glorot-uniform kernel and zero bias, or every
    parameter from N(0, 1) (the bias with a seed of its own, so it is not the kernel's first values)."""
    if spec.init == "normal":
        return {"kernel_initializer": keras.initializers.RandomNormal(0.0, 1.0, seed=seed),
                "bias_initializer": keras.initializers.RandomNormal(0.0, 1.0, seed=seed + 500_009)}
    return {"kernel_initializer": keras.initializers.GlorotUniform(seed=seed), "bias_initializer": "zeros"}


def standardization(model: keras.Model) -> tuple[np.ndarray, np.ndarray]:
    """The (mean, variance) built into a model from `build`."""
    layer = model.get_layer(STANDARDIZE)
    return (np.asarray(layer.mean.numpy(), dtype=np.float64),
            np.asarray(layer.variance.numpy(), dtype=np.float64))


def _validation_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices: stratified when every class has 2+ rows, random otherwise;
    no validation when the shard is too small to spare rows. A function of the labels and the
    seed only, so a small shard's split is made once and kept (it trains again every FedAvg round;
    scikit-learn's checks cost more than its epochs)."""
    if len(y) > _SPLITS_KEPT_ROWS:
        return _split(np.asarray(y), fraction, seed)
    return _split_of(np.asarray(y, dtype=np.int64).tobytes(), float(fraction), int(seed))


_SPLITS_KEPT_ROWS = 5_000  # at most 128 splits kept, of at most this many rows: ~10 MB


@functools.lru_cache(maxsize=128)
def _split_of(labels: bytes, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.frombuffer(labels, dtype=np.int64)
    tr, va = _split(y, fraction, seed)
    tr.setflags(write=False)  # kept: shared by every later call
    va.setflags(write=False)
    return tr, va


def _split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(y)
    n_val = int(round(fraction * n))
    if fraction <= 0 or n_val < 1 or n - n_val < 2:
        return np.arange(n), np.arange(0)
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    present = int((counts > 0).sum())
    strat = y if counts[counts > 0].min() >= 2 and n_val >= present and n - n_val >= present else None
    tr, va = train_test_split(np.arange(n), test_size=n_val, random_state=seed, stratify=strat)
    return np.sort(tr), np.sort(va)


def check_shard(shard: Dataset, n_classes: int) -> None:
    """Raise TrainingError when the shard cannot train a classifier."""
    if len(shard) < MIN_ROWS:
        raise TrainingError(f"the shard has {len(shard)} rows; training needs at least {MIN_ROWS}")
    present = np.unique(shard.y)
    if len(present) < 2:
        label = shard.classes[int(present[0])] if len(present) and shard.classes else "?"
        raise TrainingError(f"the shard's rows all have the same class ({label!r}); "
                            "training needs rows of at least 2 classes")
    if n_classes < 2 or int(shard.y.max()) >= n_classes:
        raise TrainingError(f"n_classes={n_classes} does not cover the shard's labels (0..{int(shard.y.max())})")
    if not np.isfinite(shard.X).all():
        raise TrainingError("the shard has non-finite feature values")


def train(spec: ModelSpec, shard: Dataset, n_classes: int, *, validation_fraction: float = 0.2,
          initial: keras.Model | None = None, stats: tuple[ArrayLike, ArrayLike] | None = None,
          epochs: int | None = None, template: keras.Model | None = None,
          keep_warm: bool = False) -> TrainResult:
    """Train a model on one shard.

    Keeps `validation_fraction` of the shard out (stratified when possible) for early stopping on
    validation loss (best weights restored) and for the reported validation accuracy/loss.
    `initial`: fine-tune from this (global) model: its weights and standardization are copied.
    `stats`: (mean, variance) to standardize with instead of the shard's own (FedAvg members share
    the pooled statistics). `epochs` overrides `spec.epochs` (e.g. a few for a FedAvg round).
    `template`: a user's model (`load_user_model`) to train from its weights instead of building
    the MLP (the first loop of its architecture trains the template itself); it gets the raw
    features (no built-in standardization) and `spec.hidden` is unused.
    `keep_warm`: keep the compiled training loop and reuse it for the next shard or round of the
    same architecture and settings, as a warm function instance would: the returned model is then
    this thread's copy, overwritten by its next such call, so save it first. The result is the same
    as without it.
    """
    check_shard(shard, n_classes)
    started = time.perf_counter()
    # No global seeding (keras.utils.set_random_seed): TensorFlow's set_seed empties its kernel
    # caches, which cost every compiled function tens of ms on its next call. What training draws
    # is seeded from spec.seed where it is drawn: initializers, the split, shuffles, seed generators.
    if template is not None:
        problem = _io_problem(template, shard.n_features, n_classes)
        if problem:
            raise TrainingError(f"the model template does not fit this task: {problem}")
    tr, va = _validation_split(shard.y, validation_fraction, spec.seed)
    proximal = initial is not None
    key = _warm_key(template, spec, shard.n_features, n_classes, proximal) if keep_warm else None
    loop = _LOOPS.get(key) if key else None
    if loop is None:
        if template is not None:
            model = template
        else:  # the standardization is set below, for this shard
            model = build(spec, shard.n_features, n_classes, np.zeros(shard.n_features), np.ones(shard.n_features))
        loop = _Loop(model, spec, proximal=proximal)
        if key:
            loop = _LOOPS.put(key, loop)  # another thread's, if it kept one first
    start = compiled.read_weights(initial) if initial is not None else (
        template.get_weights() if template is not None else loop.initial_weights)
    with loop.lock:  # one training at a time on a loop's model
        model = loop.model
        mine = [tuple(v.shape) for v in model.weights]
        if [w.shape for w in start] != mine:
            fits = "the model template" if template is not None else f"the spec {spec.to_dict()}"
            raise TrainingError(f"the initial model's weights {[w.shape for w in start]} do not fit {fits} "
                                f"with {shard.n_features} features and {n_classes} classes ({mine})")
        compiled.assign_weights(model, start)
        if initial is None and template is None:  # a fresh MLP standardizes with the shard's (or pooled) statistics
            mean, variance = stats if stats is not None else (shard.X.astype(np.float64).mean(axis=0),
                                                              shard.X.astype(np.float64).var(axis=0))
            _set_standardization(model, mean, variance)
        ran, probabilities = loop.run(shard.X[tr], shard.y[tr], shard.X[va], shard.y[va],
                                      int(epochs if epochs is not None else spec.epochs), spec.learning_rate)
        validation: dict[str, float | None] = {"rows": int(len(va)), "accuracy": None, "loss": None}
        if len(va):
            p = probabilities.astype(np.float64)
            picked = np.clip(p[np.arange(len(va)), shard.y[va]], 1e-7, 1.0)
            validation.update(accuracy=float(np.mean(p.argmax(axis=1) == shard.y[va])),
                              loss=float(-np.mean(np.log(picked))))
        if key:  # the loop's model trains the next shard at once, perhaps for another thread
            model = _LOOPS.thread_copy(key, model)
    return TrainResult(model, len(shard), validation, time.perf_counter() - started, ran, shard.subset(va))


class _Loop:
    """One model's training loop, compiled once: Adam (or plain SGD) on mini-batches, the epochs
    of a run in one TensorFlow call (Keras `fit` costs ~50x more per step for models this small,
    and a call per epoch costs more than a small shard's epoch). The rows are the functions'
    arguments, so one loop trains any shard of its architecture and settings. `run` trains from
    the model's current weights with a fresh optimizer state, so a loop kept warm trains exactly
    as a new one would. With `spec.early_stopping`, stops after PATIENCE epochs without a better
    validation loss and restores the best weights; without it, runs exactly `epochs` epochs.
    `proximal`: spec.proximal_mu / 2 * ||w - the weights at the start of the run||^2 is added to
    the training loss (FedProx). Shuffling is seeded by spec.seed."""

    def __init__(self, model: keras.Model, spec: ModelSpec, proximal: bool = False) -> None:
        import tensorflow as tf

        self.model, self.spec, self.lock = model, spec, threading.Lock()
        self.initial_weights = model.get_weights()  # a fresh model's: where a run with no other start begins
        # random layers (Dropout, noise) draw from seed generators; a loaded or built model takes
        # their state from the process's random numbers, so `run` sets it from the spec's seed
        self.seed_states = [v for v in model.variables if v.path.endswith("seed_generator_state")]
        if spec.optimizer == "sgd":
            self.optimizer = keras.optimizers.SGD(learning_rate=spec.learning_rate, momentum=0.0)
        else:
            self.optimizer = keras.optimizers.Adam(learning_rate=spec.learning_rate)
        params, weights = model.trainable_variables, model.weights
        self.optimizer.build(params)
        loss_fn = keras.losses.SparseCategoricalCrossentropy()
        mu = spec.proximal_mu if proximal else 0.0
        self.anchor = [tf.Variable(p.numpy(), trainable=False) for p in params] if mu > 0 else []
        # early stopping keeps the best epoch's weights here, in the graph (get_weights would copy them out)
        self.best = [tf.Variable(w, trainable=False) for w in weights] if spec.early_stopping else []
        self.best_loss = tf.Variable(np.inf, dtype=tf.float32, trainable=False)
        anchor, best, best_loss, batch_size = self.anchor, self.best, self.best_loss, spec.batch_size
        rows = tf.TensorSpec((None, int(model.inputs[0].shape[-1])), tf.float32)
        labels, orders_spec = tf.TensorSpec((None,), tf.int64), tf.TensorSpec((None, None), tf.int32)
        count, flag = tf.TensorSpec((), tf.int32), tf.TensorSpec((), tf.bool)

        def objective(yb: Tensor, xb: Tensor) -> Tensor:
            loss = loss_fn(yb, model(xb, training=True))
            if anchor:  # one anchor per trainable parameter
                loss += (mu / 2) * tf.add_n([tf.reduce_sum(tf.square(p - a))
                                             for p, a in zip(params, anchor, strict=True)])
            return loss

        def epoch(X: Tensor, y: Tensor, X_val: Tensor, y_val: Tensor, order: Tensor) -> Tensor:
            """One epoch of mini-batches in `order`; with early stopping, then whether the
            validation loss is the best yet (its weights kept in `best`)."""
            n = tf.shape(order)[0]
            batch = tf.minimum(batch_size, n)
            for i in tf.range((n + batch - 1) // batch):
                idx = order[i * batch:(i + 1) * batch]
                xb, yb = tf.gather(X, idx), tf.gather(y, idx)
                with tf.GradientTape() as tape:
                    loss = objective(yb, xb)
                self.optimizer.apply_gradients(zip(tape.gradient(loss, params), params, strict=True))
            if not best:
                return tf.constant(False)
            current = loss_fn(y_val, model(X_val, training=False))
            better = current < best_loss  # never with no validation rows: NaN
            if better:
                best_loss.assign(current)
                for kept, w in zip(best, weights, strict=True):
                    kept.assign(w)
            return better

        @tf.function(input_signature=[rows, labels, rows, labels, orders_spec, flag, count, flag])  # type: ignore[untyped-decorator]
        def fit(X: Tensor, y: Tensor, X_val: Tensor, y_val: Tensor, orders: Tensor, stopping: Tensor,
                wait: Tensor, kept: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            """An epoch for each row of `orders`; with `stopping`, to PATIENCE epochs in a row
            without a better validation loss (`wait` of them before this call). The epochs run,
            and `wait` and whether a best epoch was kept, after them."""
            ran = tf.constant(0)
            for e in tf.range(tf.shape(orders)[0]):
                better = epoch(X, y, X_val, y_val, orders[e])
                ran = e + 1
                if stopping:
                    kept = kept | better
                    wait = tf.where(better, 0, wait + 1)
                    if wait >= PATIENCE:
                        break
            return ran, wait, kept

        optimizer, seed_states = self.optimizer, self.seed_states
        seeds = [np.asarray([spec.seed * 1009 + i + 1, 0], dtype=v.dtype) for i, v in enumerate(seed_states)]

        @tf.function(input_signature=[tf.TensorSpec((), tf.float32)])  # type: ignore[untyped-decorator]
        def begin(learning_rate: Tensor) -> None:
            """A fresh optimizer (no moments, step 0) at `learning_rate`, the seed generators at the
            spec's seed (the same masks every run), the proximal anchors at the starting weights."""
            for variable in optimizer.variables:
                variable.assign(tf.zeros_like(variable))
            for state, seed in zip(seed_states, seeds, strict=True):
                state.assign(seed)
            optimizer.learning_rate = learning_rate
            for kept_anchor, param in zip(anchor, params, strict=False):  # none without FedProx
                kept_anchor.assign(param)
            best_loss.assign(np.inf)

        @tf.function(input_signature=[rows, flag])  # type: ignore[untyped-decorator]
        def finish(X_val: Tensor, kept: Tensor) -> Tensor:
            """Restore the best epoch's weights if one was kept; the validation rows' probabilities."""
            if best and kept:  # `best` is a list: without early stopping nothing is kept
                for weight, kept_weight in zip(weights, best, strict=True):
                    weight.assign(kept_weight)
            return model(X_val, training=False)

        self.begin, self.fit, self.finish = begin, fit, finish

    def run(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, epochs: int,
            learning_rate: float) -> tuple[int, np.ndarray]:
        """Train on (X, y) for at most `epochs` epochs, stopping early on (X_val, y_val); the
        epochs run and the trained model's probabilities on X_val."""
        import tensorflow as tf

        self.begin(learning_rate)
        X_t, y_t = tf.constant(X, tf.float32), tf.constant(y, tf.int64)
        Xv_t, yv_t = tf.constant(X_val, tf.float32), tf.constant(y_val, tf.int64)
        stopping = tf.constant(bool(self.best) and len(X_val) > 0)  # no validation rows: every epoch runs
        rng = np.random.default_rng(self.spec.seed)
        per_call = max(1, _ORDER_ENTRIES // max(1, len(X)))  # the shuffles of the epochs of one call
        ran, wait, kept = 0, tf.constant(0), tf.constant(False)
        while ran < epochs:
            chunk = min(per_call, epochs - ran)
            orders = np.stack([rng.permutation(len(X)) for _ in range(chunk)]).astype(np.int32)
            done, wait, kept = self.fit(X_t, y_t, Xv_t, yv_t, tf.constant(orders), stopping, wait, kept)
            ran += int(done)
            if int(wait) >= PATIENCE:  # stopped early
                break
        return ran, np.asarray(self.finish(Xv_t, kept))


_ORDER_ENTRIES = 1 << 20  # shuffled row indices handed to one training call, at most (4 MB)


class _WarmLoops:
    """The compiled loops this process keeps: one per architecture and settings it trains (a run's
    first round and its fine-tuning rounds each have one; the oldest goes first). The local fleet
    runs every cloud's trainer in one process, as threads: they share the loops, each training
    under the loop's lock, and each gets its result in a model of its own (`thread_copy`)."""

    def __init__(self, size: int = 8):
        self.size = size
        self.loops: dict[WarmKey, _Loop] = {}
        self.lock = threading.Lock()
        self.copies = threading.local()

    def get(self, key: WarmKey) -> _Loop | None:
        with self.lock:
            return self.loops.get(key)

    def put(self, key: WarmKey, loop: _Loop) -> _Loop:
        """Keep `loop` for `key`, unless a loop was kept for it meanwhile: the loop kept."""
        with self.lock:
            kept = self.loops.setdefault(key, loop)
            while len(self.loops) > self.size:
                del self.loops[next(iter(self.loops))]
            return kept

    def thread_copy(self, key: WarmKey, model: keras.Model) -> keras.Model:
        """This thread's model of `key`'s architecture, with `model`'s weights: it stays as it is
        until this thread's next training of that architecture."""
        copies: dict[WarmKey, keras.Model] = self.copies.__dict__.setdefault("models", {})
        if key not in copies:
            copies[key] = keras.models.clone_model(model)
            while len(copies) > self.size:
                del copies[next(iter(copies))]
        compiled.assign_weights(copies[key], compiled.read_weights(model))
        return copies[key]


_LOOPS = _WarmLoops()
_thread_state = threading.local()


def _warm_key(template: keras.Model | None, spec: ModelSpec, n_features: int, n_classes: int,
              proximal: bool) -> WarmKey:
    """What a compiled loop depends on: the architecture (the MLP's, from the spec, or the
    template's) and the spec's training settings but the learning rate (set per run)."""
    architecture = template.to_json() if template is not None else f"mlp({n_features})"
    settings = {k: v for k, v in spec.to_dict().items() if k not in ("learning_rate", "epochs")}
    return architecture, n_classes, repr(sorted(settings.items())), proximal


def average(models: list[keras.Model], weights: list[float] | None = None) -> keras.Model:
    """FedAvg in Keras: a new model whose weights (standardization included) are the weighted
    average of the members' (all built from one spec). Equals `fusion.fuse("fedavg", ...)`."""
    if not models:
        raise ValueError("average needs at least one model")
    w = np.full(len(models), 1.0 / len(models)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(models),) or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"need one non-negative weight per model, not all 0; got {weights}")
    w = w / w.sum()
    shapes = [[x.shape for x in m.get_weights()] for m in models]
    for i, other in enumerate(shapes):
        if other != shapes[0]:
            raise ValueError(f"average needs models of one architecture; model {i}'s weights {other} differ "
                             f"from model 0's {shapes[0]}")
    averaged = [sum(wi * np.asarray(ws[j], np.float64)
                    for wi, ws in zip(w, (m.get_weights() for m in models), strict=True))
                for j in range(len(shapes[0]))]
    out = keras.models.clone_model(models[0])
    out.set_weights([a.astype(np.float32) for a in averaged])
    return out


def from_onnx(onnx_bytes: bytes, spec: ModelSpec | None = None) -> keras.Model:
    """The Keras model of an ONNX model exported from `build`'s architecture (a member, or a fedavg
    fusion of members): the layer sizes come from the initializers `dense_<i>.kernel` and
    `out.kernel`, the weights are set from them. `spec` only supplies the seed (irrelevant here)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(bytes(onnx_bytes)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    needed = ["standardize.mean", "standardize.variance", "out.kernel", "out.bias"]
    missing = [n for n in needed if n not in inits]
    if missing:
        raise ValueError(f"not a skyfuse MLP: the ONNX model lacks the initializers {missing}")
    hidden, i = [], 0
    while f"dense_{i}.kernel" in inits:
        hidden.append(int(inits[f"dense_{i}.kernel"].shape[1]))
        i += 1
    mean = inits["standardize.mean"]  # the variance comes with the other weights below
    k = int(inits["out.kernel"].shape[1])
    base = spec or ModelSpec()
    model = build(ModelSpec(tuple(hidden), base.epochs, base.batch_size, base.learning_rate, base.seed),
                  len(mean), k, mean, np.ones_like(mean))
    model.set_weights([inits[v.path.replace("/", ".")] for v in model.weights])
    return model


class UserModelError(InvalidInput):
    """A user's model that cannot be used; the message says what was expected and what was found."""


def load_user_model(spec: str, seed: int | None = None) -> keras.Model:
    """The user's Keras model named by `spec`, to train instead of the built-in MLP:

    - `PATH.keras`: a saved model;
    - `MODULE:FUNCTION`: MODULE is a Python file (`models/cnn.py:build`) or an importable dotted
      name (`mypkg.models:build`, the working directory included), FUNCTION takes no arguments and
      returns a Keras model (compiled or not: skyfuse trains it with its own loop).

    `seed` seeds Keras before FUNCTION runs, so its initial weights are reproducible. The model's
    fit to the task is `check_user_model`'s job."""
    spec = str(spec).strip()
    if spec.endswith(".keras"):
        if not Path(spec).is_file():
            raise UserModelError(f"no such file: {spec}")
        try:
            return load(spec)
        except Exception as exc:  # noqa: BLE001 - keras raises many kinds for a bad file
            raise UserModelError(f"{spec} is not a loadable .keras model: {type(exc).__name__}: {exc}") from None
    where, colon, name = spec.rpartition(":")
    if not colon or not where or not name.isidentifier():
        raise UserModelError(f"{spec!r}: expected a .keras file or MODULE:FUNCTION "
                             "(e.g. models/cnn.py:build or mypkg.models:build)")
    module = _user_module(where)
    found = getattr(module, name, None)
    if not callable(found):
        defined = sorted(n for n, v in vars(module).items() if inspect.isfunction(v)
                         and v.__module__ == module.__name__ and not n.startswith("_"))
        raise UserModelError(f"{where} has no function {name!r}; found: {', '.join(defined) or 'no functions'}")
    if seed is not None:
        keras.utils.set_random_seed(seed)
    try:
        model = found()
    except Exception as exc:  # noqa: BLE001 - the user's code: report whatever it raised
        raise UserModelError(f"{spec}: {name}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, keras.Model):
        raise UserModelError(f"{spec}: {name}() returned {type(model).__name__}, expected a keras.Model")
    return model


def _user_module(where: str) -> ModuleType:
    """The module of a `MODULE:FUNCTION` spec: a .py file, or a dotted name importable from here."""
    import importlib
    import importlib.util
    import sys

    is_file = where.endswith(".py") or "/" in where or os.sep in where
    if is_file and not Path(where).is_file():
        raise UserModelError(f"no such file: {where}")
    name = f"skyfuse_user_model_{abs(hash(str(Path(where).resolve())))}" if is_file else where
    try:
        if is_file:
            found = importlib.util.spec_from_file_location(name, where)
            if found is None or found.loader is None:  # not a suffix Python knows how to load
                raise ImportError(f"{where} is not a Python source file")
            module = sys.modules[name] = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
            return module
        sys.path.insert(0, os.getcwd())  # as `python -c` would: the user's own package here
        try:
            return importlib.import_module(where)
        finally:
            sys.path.remove(os.getcwd())
    except Exception as exc:  # noqa: BLE001 - the user's code: report whatever it raised
        if is_file:
            sys.modules.pop(name, None)
        if isinstance(exc, ModuleNotFoundError) and not is_file and f"{where}.".startswith(f"{exc.name}."):
            raise UserModelError(f"{where} cannot be imported: {exc} (give a .py path, or put its folder on "
                                 "PYTHONPATH)") from None
        raise UserModelError(f"importing {where} raised {type(exc).__name__}: {exc}") from None


def _io_problem(model: keras.Model, n_features: int, n_classes: int) -> str | None:
    """What keeps `model` from taking (None, n_features) rows and giving (None, n_classes)
    outputs, or None when it fits."""
    try:
        inputs, outputs = list(model.inputs), list(model.outputs)
    except (AttributeError, TypeError, ValueError):
        inputs = outputs = []
    if not inputs or not outputs:
        return "it has no defined input; begin it with keras.Input(shape=(d,))"
    if len(inputs) != 1 or len(outputs) != 1:
        return f"it has {len(inputs)} inputs and {len(outputs)} outputs; skyfuse needs one of each"
    got_in, got_out = tuple(inputs[0].shape), tuple(outputs[0].shape)
    if got_in != (None, n_features):
        return (f"its input is {got_in}, the data has rows of {n_features} features: take (None, {n_features}) "
                "and reshape inside the model (keras.layers.Reshape)")
    if got_out != (None, n_classes):
        binary = " (2 for a binary task: Dense(2, activation='softmax'), not one sigmoid unit)" * (n_classes == 2)
        return f"its output is {got_out}, the task needs (None, {n_classes}): one probability per class{binary}"
    return None


def check_user_model(model: keras.Model, n_features: int, n_classes: int, sample: np.ndarray) -> None:
    """Raise UserModelError unless `model` can stand in for the MLP: one input (None, n_features)
    of raw features, one output (None, n_classes) of class probabilities (checked on `sample`
    rows: finite, >= 0, rows summing to 1), and a .keras round trip that loads (what every trainer
    does: custom layers must be registered with keras.saving.register_keras_serializable and
    importable there; Lambda layers are refused)."""
    problem = _io_problem(model, n_features, n_classes)
    if problem:
        raise UserModelError(problem)
    p = np.asarray(model(np.asarray(sample, np.float32), training=False), np.float64)
    sums = p.sum(axis=1)
    if not np.isfinite(p).all() or p.min(initial=0) < -1e-6 or np.abs(sums - 1).max(initial=0) > 1e-3:
        raise UserModelError(f"its outputs are not class probabilities (on {len(p)} rows: min {p.min():.3g}, "
                             f"row sums {sums.min():.3g}..{sums.max():.3g}); end it with a softmax over the "
                             f"{n_classes} classes")
    try:
        from_bytes(to_bytes(model))
    except Exception as exc:  # noqa: BLE001 - keras raises many kinds when (de)serializing
        raise UserModelError(f"it cannot be saved and loaded again as .keras, as every trainer must "
                             f"({type(exc).__name__}: {exc}); register custom layers with "
                             "keras.saving.register_keras_serializable in an importable module, "
                             "and use no Lambda layers") from None


def predict_proba(model: keras.Model, X: np.ndarray) -> np.ndarray:
    """Class probabilities (n x k) from the Keras model, in inference mode."""
    return np.asarray(model(np.asarray(X, dtype=np.float32), training=False))


def save(model: keras.Model, path: str | Path) -> Path:
    """Save in the native .keras format (the suffix is added when missing)."""
    path = Path(path)
    if path.suffix != ".keras":
        path = path.with_name(path.name + ".keras")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_keras():
        model.save(path)
    return path


def load(path: str | Path) -> keras.Model:
    with _quiet_keras():
        return keras.models.load_model(Path(path), compile=False)


def to_bytes(model: keras.Model) -> bytes:
    """The model as the bytes of a .keras file (what the stores hold): after the first model of an
    architecture, written without Keras' walk over the model (`skyfuse.ml.saving`)."""
    from . import saving

    with _quiet_keras():
        raw = saving.dumps(model)
    if raw is not None:
        return raw
    with tempfile.TemporaryDirectory() as tmp:
        return save(model, Path(tmp) / "model.keras").read_bytes()


def from_bytes(raw: bytes, keep: bool = False) -> keras.Model:
    """The model in the bytes of a .keras file. `keep`: as a warm instance would, keep the model
    in this thread and, for the next file of the same architecture (its config), load only the
    weights into it, without Keras' walk over the model (`skyfuse.ml.saving`): the model returned
    is then overwritten by that next call."""
    from . import saving

    kept: dict[str, saving.Loaded] = _thread_state.__dict__.setdefault("models", {})
    found = None
    if keep:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            architecture = archive.read(saving.CONFIG).decode()
            found = kept.get(architecture)
            if found is not None:
                with _quiet_keras():
                    if found.load(archive):
                        return found.model
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        path.write_bytes(raw)
        if not keep:
            return load(path)
        if found is not None:  # a file laid out otherwise (another Keras wrote it): Keras reads it
            with _quiet_keras():
                found.model.load_weights(path)
            return found.model
        loaded = kept[architecture] = saving.Loaded(load(path))
        while len(kept) > _KEPT_MODELS:
            del kept[next(iter(kept))]
        return loaded.model


_KEPT_MODELS = 4


@contextlib.contextmanager
def _quiet_keras() -> Iterator[None]:
    """Hide Keras' own NumPy 2 deprecation noise (`__array__` without `copy`) when saving/loading."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        yield


def with_onnx_weights(model: keras.Model, values: Mapping[str, ArrayLike]) -> keras.Model:
    """`model` with every weight set from `values`, keyed by the ONNX initializer name the
    exporter gives that weight (`dense_0.kernel` for `dense_0/kernel`): how a global model a
    server strategy made over ONNX parameters returns to Keras for the next round's trainers."""
    from .export import _weight_name

    names = [_weight_name(v.path, model.name) for v in model.weights]
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(f"no values for the model's weights {missing[:5]}")
    shapes = [(n, tuple(v.shape), np.shape(values[n])) for n, v in zip(names, model.weights, strict=True)
              if tuple(v.shape) != np.shape(values[n])]
    if shapes:
        raise ValueError(f"weight {shapes[0][0]!r} has shape {shapes[0][1]}, the values {shapes[0][2]}")
    model.set_weights([np.asarray(values[n], dtype=v.dtype) for n, v in zip(names, model.weights, strict=True)])
    return model
