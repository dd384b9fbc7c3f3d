"""Does an ONNX model refer to files? Checked on its bytes, before onnxruntime sees them.

onnxruntime loads a tensor stored as *external data* from a path relative to the working
directory, so a model from an untrusted store could read any file the process can (and its output
would leak it). skyfuse models never use external data; any tensor that does, anywhere in the
model (initializers, sparse initializers, constant attributes, subgraphs, functions, training
graphs), is refused by name.

Pure Python over the protobuf wire format (the serving path imports onnxruntime and numpy, never
the `onnx` package). Field numbers are onnx.proto's.
"""
from __future__ import annotations

from collections.abc import Iterator

from skyfuse.errors import InvalidInput

MODEL, GRAPH, NODE, ATTRIBUTE, TENSOR, SPARSE, TRAINING, FUNCTION = range(8)

# message kind → {field number: kind of the submessage in that field}
CHILDREN: dict[int, dict[int, int]] = {
    MODEL: {7: GRAPH, 20: TRAINING, 25: FUNCTION},
    GRAPH: {1: NODE, 5: TENSOR, 15: SPARSE},
    NODE: {5: ATTRIBUTE},
    ATTRIBUTE: {5: TENSOR, 6: GRAPH, 10: TENSOR, 11: GRAPH, 22: SPARSE, 23: SPARSE},
    SPARSE: {1: TENSOR, 2: TENSOR},
    TRAINING: {1: GRAPH, 2: GRAPH},
    FUNCTION: {7: NODE},
    TENSOR: {},
}
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION, EXTERNAL = 8, 13, 14, 1
MAX_DEPTH = 64


class Malformed(InvalidInput):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise Malformed("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, memoryview | int | None]]:
    """(field number, value) of each field; the value of a length-delimited field (wire type 2) is
    its bytes, of a varint the number, of a fixed-size field None."""
    pos = 0
    value: memoryview | int | None
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise Malformed(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise Malformed("field runs past the end of its message")
        yield number, value


def external_tensors(model: bytes) -> list[str]:
    """Names of the tensors stored as external data (empty for a self-contained model).
    Raises `Malformed` for bytes that are not a protobuf message."""
    found: list[str] = []
    stack: list[tuple[memoryview, int, int]] = [(memoryview(model), MODEL, 0)]
    while stack:
        buf, kind, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise Malformed(f"messages nested deeper than {MAX_DEPTH}")
        name, external = "", False
        for number, value in _fields(buf):
            if kind == TENSOR:
                if number == TENSOR_NAME and isinstance(value, memoryview):
                    name = bytes(value).decode("utf-8", "replace")
                elif number == TENSOR_EXTERNAL_DATA or (number == TENSOR_DATA_LOCATION and value == EXTERNAL):
                    external = True
            child = CHILDREN[kind].get(number)
            if child is not None and isinstance(value, memoryview):  # a submessage
                stack.append((value, child, depth + 1))
        if external:
            found.append(name or "(unnamed tensor)")
    return found


def refuse_external_data(model: bytes, what: str) -> None:
    """Raise ValueError naming the tensors when `model` refers to external data."""
    try:
        names = external_tensors(model)
    except Malformed as exc:
        raise ValueError(f"{what} is not a loadable ONNX model: not a well-formed protobuf message ({exc})") from None
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ValueError(f"{what} refers to files outside itself (external data in tensor(s) {shown}); "
                         "skyfuse serves only self-contained models: save it without external data")
