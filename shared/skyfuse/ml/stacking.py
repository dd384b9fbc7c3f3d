"""One run of the members' shared structure over all K members at once: what `skyfuse.ml.fusion`
builds for an ensemble of members of one structure (the models of one ModelSpec), so that its graph
has one member's nodes and a fixed few more, whatever K. Inlined side by side, K members cost K times
the nodes, and onnxruntime's cost per node grows faster than K.

A tensor the member computes from its input, [N, C] in the member, is laid out [1, K*C, N]: member
i's features are rows i*C..(i+1)*C and the batch runs along the last axis, so a dense layer (MatMul
and its bias Add, or Gemm) is ONE grouped 1x1 Conv with the bias folded in (which onnxruntime also
fuses with a Relu after it), and a per-feature constant [C] broadcasts as [1, K*C, 1], whatever N.
Values equal in every member (a pooled standardization) are not repeated: the input standardized by
shared constants stays [1, C, N]. `Unsupported` says the members use an op or a shape this module
has no rule for (the fuser then inlines them).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx
from numpy.typing import ArrayLike, DTypeLike
from onnx import helper, numpy_helper


class Builder(Protocol):
    """Where the nodes and constants go (`skyfuse.ml.fusion`'s builder of the fused graph)."""

    nodes: list[onnx.NodeProto]

    def const(self, stem: str, value: ArrayLike, dtype: DTypeLike = ...) -> str: ...

    def op(self, op_type: str, inputs: list[str], out: str | None = None, stem: str | None = None,
           **attrs: Any) -> str: ...


_UNARY = frozenset({"Abs", "Cast", "Ceil", "Clip", "Elu", "Erf", "Exp", "Floor", "HardSigmoid", "Identity",
                    "LeakyRelu", "Log", "Neg", "Reciprocal", "Relu", "Selu", "Sigmoid", "Softplus", "Softsign",
                    "Sqrt", "Tanh"})  # elementwise on input 0; other inputs (Clip's bounds) must be shared constants
_BINARY = frozenset({"Add", "Sub", "Mul", "Div"})  # elementwise with numpy broadcasting
_ONE_AXIS = frozenset({"Softmax", "LogSoftmax"})  # along one axis (`axis`)
_F32 = np.dtype(np.float32)


class Unsupported(Exception):
    """The members cannot run stacked (an op or a shape `Stacker` does not stack)."""


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: `Stacker` caches what it emits per value
class _Value:
    """A member's tensor in the stacked graph, by its `shape` in one member. A `batch` value (computed
    from the input: shape (None, C), C None when unknown) is laid out [1, K*C, N] when `stacked`,
    [1, C, N] when the same for every member. Any other value is a constant of the member, [K, *shape]
    when stacked, computed (`name`) or known (`arrays`: one per member, one when shared), which enters
    the graph shaped for each use."""

    shape: tuple[int | None, ...]
    dtype: np.dtype[Any]
    stacked: bool
    batch: bool = False
    name: str = ""
    arrays: tuple[np.ndarray, ...] = ()

    @property
    def width(self) -> int | None:
        return self.shape[-1]


def _known(arrays: Sequence[np.ndarray]) -> _Value:
    first = arrays[0]
    shared = all(np.array_equal(first, a) for a in arrays[1:])
    return _Value(first.shape, first.dtype, not shared, arrays=(first,) if shared else tuple(arrays))


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if "value" in attrs:
        value: np.ndarray = numpy_helper.to_array(attrs["value"])
        return value
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype)
    raise Unsupported(f"Constant {sorted(attrs)}")


def _dims(v: _Value) -> tuple[int, ...]:
    """The shape of a constant of the member (only a batch value has an unknown dim)."""
    assert not v.batch
    return tuple(d or 0 for d in v.shape)


def _row(v: _Value) -> int:
    """c of a constant the member broadcasts as a row [1, c] against its [N, C] tensors."""
    shape = (1,) * (2 - len(v.shape)) + v.shape
    if len(shape) != 2 or shape[0] != 1 or shape[1] is None:
        raise Unsupported(f"a constant of shape {list(v.shape)} against a batch")
    return shape[1]


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


class Stacker:
    """Emits the members' shared structure (they must have one: `fusion._structure_difference`), run
    over all of them at once, into `b`; `output()` names the members' outputs laid out [K, k, N]."""

    def __init__(self, models: list[onnx.ModelProto], b: Builder, input_name: str, output_name: str):
        self.k, self.b, self.graph, self.output_name = len(models), b, models[0].graph, output_name
        self.uses = Counter(x for node in self.graph.node for x in node.input)
        self.uses.update(o.name for o in self.graph.output)
        self.emitted: dict[tuple[_Value, Any], str] = {}
        self.ints: dict[tuple[int, ...], str] = {}
        self.grouped: dict[str, str] = {}  # a stacked batch tensor [1, K*C, N] -> its view [K, C, N]
        self.biasless: dict[str, tuple[onnx.NodeProto, str]] = {}  # Conv output -> (the Conv, the member's name)
        dim = next(v for v in self.graph.input if v.name == input_name).type.tensor_type.shape.dim[1]
        columns = b.op("Transpose", [input_name], stem="features_t", perm=[1, 0])
        self.values = {input_name: _Value((None, dim.dim_value or None), _F32, False, batch=True,
                                     name=b.op("Unsqueeze", [columns, self.int64(0)], stem="features_fm"))}
        tables = [{t.name: t for t in m.graph.initializer} for m in models]
        for name in tables[0]:
            self.values[name] = _known([numpy_helper.to_array(table[name]) for table in tables])

    def output(self) -> str:
        """The members' output [N, k] as one [K, k, N] ([1, k, N] when every member computes the same)."""
        for node in self.graph.node:
            self.values[node.output[0]] = self.node(node)
        prob = self.values[self.output_name]
        if not prob.batch:
            raise Unsupported("the output does not depend on the features")
        return self.group(prob) if prob.stacked else prob.name

    def int64(self, *values: int) -> str:
        if values not in self.ints:
            self.ints[values] = self.b.const("ints", list(values), np.int64)
        return self.ints[values]

    def group(self, v: _Value) -> str:
        if v.name not in self.grouped:
            self.grouped[v.name] = self.b.op("Reshape", [v.name, self.int64(self.k, -1, 0)], stem="grouped")
        return self.grouped[v.name]

    def node(self, node: onnx.NodeProto) -> _Value:
        if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            raise Unsupported(f"{node.domain}:{node.op_type} with {len(node.output)} outputs")
        if node.op_type == "Constant":
            return _known([_constant_value(node)])
        missing = [x for x in node.input if x and x not in self.values]
        if missing:
            raise Unsupported(f"{node.op_type} reads {missing}, which no member node computes")
        ins = [self.values[x] if x else None for x in node.input]
        if node.op_type in _UNARY and ins[0] is not None:
            return self.unary(node, ins[0], ins[1:])
        if node.op_type in _BINARY and len(ins) == 2 and ins[0] is not None and ins[1] is not None:
            return self.binary(node, ins[0], ins[1])
        if node.op_type in _ONE_AXIS and len(ins) == 1 and ins[0] is not None:
            return self.one_axis(node, ins[0])
        if node.op_type in ("MatMul", "Gemm") and len(ins) >= 2 and ins[0] is not None and ins[1] is not None:
            return self.dense(node, ins[0], ins[1], ins[2] if len(ins) > 2 else None)
        raise Unsupported(node.op_type)

    def emit(self, node: onnx.NodeProto, inputs: list[str], op_type: str = "", **attrs: Any) -> str:
        """The member's node on stacked inputs, its attributes kept unless `attrs` replaces them (all
        of them when it becomes another `op_type`)."""
        name = f"stack_{node.output[0]}"  # apart from the fuser's `fuse_*` and the graph's input and output
        copy = helper.make_node(op_type or node.op_type, inputs, [name], name=f"{name}_node", **attrs)
        if not op_type:
            copy.attribute.extend(a for a in node.attribute if a.name not in attrs)
        self.b.nodes.append(copy)
        return name

    # constants of the member: [K, *shape] when stacked, else as the member has them

    def natural(self, v: _Value, rank: int | None = None) -> str:
        """A constant as an input of a member op on constants whose output has `rank` dims: stacked with
        1s after the member axis, so it broadcasts against the others as the member's does."""
        rank = len(v.shape) if rank is None or not v.stacked else rank
        key = (v, rank)
        if key not in self.emitted:
            lift = rank - len(v.shape)
            if v.arrays:
                value = np.stack(v.arrays).reshape((self.k,) + (1,) * lift + _dims(v)) if v.stacked else v.arrays[0]
                self.emitted[key] = self.b.const("stacked" if v.stacked else "shared", value, value.dtype)
            elif lift:
                self.emitted[key] = self.b.op("Unsqueeze", [v.name, self.int64(*range(1, 1 + lift))], stem="lift")
            else:
                self.emitted[key] = v.name
        return self.emitted[key]

    # batch tensors: [1, K*C, N], or [1, C, N] when shared

    def laid_out(self, v: _Value, out: _Value) -> str:
        """v as an input of an elementwise op whose output is the batch value `out`."""
        key = (v, (out.stacked, out.width))
        if key in self.emitted:
            return self.emitted[key]
        repeat = out.stacked and not v.stacked  # a shared input against stacked ones: its rows once per member
        if v.batch:
            name = self.b.op("Tile", [v.name, self.int64(1, self.k, 1)], stem="tiled") if repeat else v.name
        else:
            c = _row(v)
            if v.stacked and c == 1 and out.width != 1:  # a per-member scalar: once per feature of that member
                if not v.arrays or out.width is None:
                    raise Unsupported("a computed per-member scalar against a batch")
                value = np.concatenate([np.full(out.width, a.reshape(()), a.dtype) for a in v.arrays])
            elif v.arrays:
                rows = [a.reshape(-1) for a in v.arrays]
                value = np.concatenate(rows if v.stacked else rows * (self.k if repeat and c > 1 else 1))
            else:
                value = None
            if value is not None:
                name = self.b.const("row", value.reshape(1, -1, 1), value.dtype)
            else:
                name = self.b.op("Reshape", [v.name, self.int64(1, -1, 1)], stem="row")
                if repeat and c > 1:
                    name = self.b.op("Tile", [name, self.int64(1, self.k, 1)], stem="row_tiled")
        self.emitted[key] = name
        return name

    def unary(self, node: onnx.NodeProto, x: _Value, rest: list[_Value | None]) -> _Value:
        if any(v is not None and (v.stacked or v.batch) for v in rest):
            raise Unsupported(f"{node.op_type} with per-member bounds")
        dtype = x.dtype
        if node.op_type == "Cast":
            try:
                dtype = np.dtype(helper.tensor_dtype_to_np_dtype(_attr(node, "to", 0)))
            except (KeyError, TypeError, ValueError):
                raise Unsupported(f"Cast to {_attr(node, 'to', 0)}") from None
        inputs = [x.name if x.batch else self.natural(x)] + [self.natural(v) if v else "" for v in rest]
        return _Value(x.shape, dtype, x.stacked, x.batch, self.emit(node, inputs))

    def binary(self, node: onnx.NodeProto, a: _Value, c: _Value) -> _Value:
        stacked = a.stacked or c.stacked
        if not (a.batch or c.batch):
            shape = np.broadcast_shapes(_dims(a), _dims(c))
            name = self.emit(node, [self.natural(v, len(shape)) for v in (a, c)])
            return _Value(shape, a.dtype, stacked, name=name)
        widths = {v.width for v in (a, c) if v.batch} | ({_row(v) for v in (a, c) if not v.batch} - {1})
        if len(widths - {None}) > 1 or (stacked and not widths - {None}):
            raise Unsupported(f"{node.op_type} of widths {widths}")
        width = next(iter(widths - {None}), None)
        if any(v.batch and (v.stacked or stacked) and v.width != width for v in (a, c)):
            raise Unsupported(f"{node.op_type}: a batch tensor of another or unknown width against stacked ones")
        folded = self.fold_bias(node, a, c, width)
        if folded is not None:
            return folded
        out = _Value((None, width), a.dtype, stacked, batch=True)
        return _Value(out.shape, out.dtype, stacked, True, self.emit(node, [self.laid_out(v, out) for v in (a, c)]))

    def one_axis(self, node: onnx.NodeProto, x: _Value) -> _Value:
        rank, axis = len(x.shape), _attr(node, "axis", -1)
        if not -rank <= axis < rank:
            raise Unsupported(f"{node.op_type} axis {axis} of a rank {rank} tensor")
        if not x.batch:  # counted from the end: the same axis with the member axis in front
            name = self.emit(node, [self.natural(x)], axis=axis - rank if axis >= 0 else axis)
            return _Value(x.shape, x.dtype, x.stacked, name=name)
        if axis % rank != 1:
            raise Unsupported(f"{node.op_type} across the batch")
        if not x.stacked:  # [1, C, N]: the features are axis 1
            return _Value(x.shape, x.dtype, False, True, self.emit(node, [x.name], axis=1))
        per_member = self.emit(node, [self.group(x)], axis=1)  # on [K, C, N]
        name = self.b.op("Reshape", [per_member, self.int64(1, -1, 0)], stem="flat")
        self.grouped[name] = per_member
        return _Value(x.shape, x.dtype, True, True, name)

    def dense(self, node: onnx.NodeProto, a: _Value, w: _Value, c: _Value | None) -> _Value:
        """MatMul of a batch tensor by a known matrix, or Gemm (alpha A B' + beta C): a 1x1 Conv with
        one group per member (one group when the input is shared), the weights folded in."""
        gemm = node.op_type == "Gemm"
        if not gemm and not (a.batch or w.batch) and len(a.shape) == len(w.shape) == 2:
            name = self.emit(node, [self.natural(a), self.natural(w)])
            return _Value((a.shape[0], w.shape[1]), a.dtype, a.stacked or w.stacked, name=name)
        if (not a.batch or w.batch or not w.arrays or len(w.shape) != 2 or a.dtype != _F32 or w.dtype != _F32
                or (gemm and _attr(node, "transA", 0))):
            raise Unsupported(f"{node.op_type} of these operands")
        kernels = w.arrays
        if gemm and _attr(node, "transB", 0):
            kernels = tuple(k.T for k in kernels)
        if gemm and _attr(node, "alpha", 1.0) != 1.0:
            kernels = tuple(k * np.float32(_attr(node, "alpha", 1.0)) for k in kernels)
        d_in, width = kernels[0].shape
        if a.width not in (None, d_in):
            raise Unsupported(f"{node.op_type} of a [N, {a.width}] tensor by [{d_in}, {width}]")
        stacked = a.stacked or w.stacked
        matrices = (np.stack(kernels) if w.stacked
                    else np.broadcast_to(kernels[0], (self.k if stacked else 1, d_in, width)))
        weight = np.ascontiguousarray(matrices.transpose(0, 2, 1)).reshape(-1, d_in, 1)  # [K*C, d, 1]
        out = _Value((None, width), _F32, stacked, True)
        inputs = [a.name, self.b.const("kernel", weight)]
        beta = _attr(node, "beta", 1.0)
        if c is not None and beta != 0.0:
            if c.batch or not c.arrays or _row(c) not in (1, width) or (c.stacked and not stacked):
                raise Unsupported("Gemm with a C that is not a known bias row")
            inputs.append(self.bias([row * np.float32(beta) for row in c.arrays], out))
        name = self.emit(node, inputs, "Conv", group=self.k if a.stacked else 1, kernel_shape=[1])
        if not gemm:
            self.biasless[name] = (self.b.nodes[-1], node.output[0])
        return _Value(out.shape, _F32, stacked, True, name)

    def bias(self, rows: Sequence[np.ndarray], out: _Value) -> str:
        """A Conv's bias [K*C] (or [C]) from the member's bias rows, one per member or one shared."""
        assert out.width is not None  # a Conv's output
        full = [np.broadcast_to(r.reshape(-1), (out.width,)) for r in rows]
        repeat = self.k if out.stacked and len(full) == 1 else 1
        return self.b.const("bias", np.concatenate(full * repeat), np.float32)

    def fold_bias(self, node: onnx.NodeProto, a: _Value, c: _Value, width: int | None) -> _Value | None:
        """The Add of a bias row right after a MatMul, as the bias of the MatMul's Conv (None: not that)."""
        x, bias = (a, c) if a.batch else (c, a)
        conv, member_name = self.biasless.get(x.name, (None, ""))
        if (node.op_type != "Add" or conv is None or bias.batch or not bias.arrays or self.uses[member_name] != 1
                or bias.dtype != _F32 or width != x.width or (bias.stacked and not x.stacked)):
            return None
        conv.input.append(self.bias(bias.arrays, x))
        del self.biasless[x.name]
        return x
