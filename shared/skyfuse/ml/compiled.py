"""A model's weights read or set, and its forward pass, each in one TensorFlow call.

Keras' `get_weights` reads each variable with an op of its own, `set_weights` assigns each with
one, and an eager forward pass runs each layer's ops one by one; each op lets go of the GIL, and
where the functions are threads of one process (the local fleet) every op is a hand-off to another
thread and back. These give the same values in one call per model, compiled on the model's second
use (a model used once, as a cold training's, is not worth compiling) and kept while it lives.
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    import keras


class _Functions:
    """A model's compiled reader, assigner and forward pass (they hold its variables, not the model)."""

    def __init__(self, model: keras.Model) -> None:
        import tensorflow as tf

        variables = list(model.weights)
        self.dtypes = [np.dtype(v.dtype) for v in variables]
        traced = weakref.ref(model)  # traced while the caller holds it; a reference here would keep it alive
        rows = [tf.TensorSpec(model.inputs[0].shape, model.inputs[0].dtype)] if len(model.inputs) == 1 else None

        @tf.function(autograph=False)  # type: ignore[untyped-decorator]  # TensorFlow ships no types
        def read() -> list[Any]:
            return [tf.identity(v.value) for v in variables]

        @tf.function(input_signature=[tf.TensorSpec(v.shape, v.dtype) for v in variables],  # type: ignore[untyped-decorator]
                     autograph=False)
        def assign(*values: Any) -> None:
            for variable, value in zip(variables, values, strict=True):
                variable.assign(value)

        @tf.function(input_signature=rows, autograph=False)  # type: ignore[untyped-decorator]
        def forward(x: Any) -> Any:
            alive = traced()
            assert alive is not None, "traced on a call with the model"
            return alive(x, training=False)

        self.read: Callable[[], list[Any]] = read
        self.assign: Callable[..., None] = assign
        self.forward: Callable[[Any], Any] | None = forward if rows else None


_SEEN: weakref.WeakKeyDictionary[keras.Model, _Functions | None] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _functions(model: keras.Model) -> _Functions | None:
    """The model's functions from its second use on; None on its first."""
    with _LOCK:
        if model not in _SEEN:
            _SEEN[model] = None
            return None
        found = _SEEN[model]
    if found is None:
        found = _Functions(model)
        with _LOCK:
            _SEEN[model] = found
    return found


def read_weights(model: keras.Model) -> list[np.ndarray]:
    """`model.get_weights()`."""
    functions = _functions(model)
    if functions is None:
        values: list[np.ndarray] = model.get_weights()
        return values
    return [np.asarray(t) for t in functions.read()]


def assign_weights(model: keras.Model, values: Sequence[ArrayLike]) -> None:
    """`model.set_weights(values)`: one value of each weight's shape, in `model.weights` order."""
    functions = _functions(model)
    if functions is None:
        model.set_weights(values)
        return
    if len(values) != len(functions.dtypes):
        raise ValueError(f"{len(values)} values for the model's {len(functions.dtypes)} weights")
    functions.assign(*[np.asarray(value, dtype=dtype) for value, dtype in zip(values, functions.dtypes, strict=True)])


def forward(model: keras.Model, X: ArrayLike) -> np.ndarray:
    """`model(X, training=False)` on float32 rows, as an array."""
    rows = np.asarray(X, dtype=np.float32)
    functions = _functions(model)
    if functions is None or functions.forward is None:
        return np.asarray(model(rows, training=False))
    return np.asarray(functions.forward(rows))
