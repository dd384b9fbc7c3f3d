"""The .keras files the stores hold, written and read without Keras' walk over the model and,
once an architecture's file is known, without HDF5.

A .keras file is a zip of `metadata.json`, `config.json` and `model.weights.h5`. Keras finds the
H5 groups by walking the model's attributes (`dir()` of every layer) on each save and each
`load_weights`, and h5py makes dozens of calls per file, each letting go of the GIL: for the
small models here that is most of a save or a load, paid by every shard in every round (its
trainer saves, its exporter loads), and in the local fleet every GIL hand-off is a thread switch.

- `Layout.of` records the walk once per architecture: which H5 group, with which metadata, holds
  which of `model.weights`. Replayed through Keras' own H5 store (`Layout.h5`, `Layout.read_h5`),
  it writes the file Keras writes and reads one with Keras' checks (no links, no external or
  oversized datasets, the count of each group).
- `Image`: the H5 file of an architecture whose weights lie as plain contiguous arrays. Two such
  files that agree byte for byte outside the weights' bytes differ only in the weights' values,
  so the next file is the known one with the new values in place, and a file that agrees with the
  known one outside them is read by slicing. A file that does not agree is read by `read_h5` and
  becomes the known one.

A model whose walk stores anything but its own weights (a compiled model's optimizer, a layer that
saves derived arrays) has no layout: Keras saves and loads it as before.
"""
from __future__ import annotations

import io
import threading
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
from keras.src.saving import saving_lib  # the format's own writer, reader and walk (no public API for them)

from . import compiled

if TYPE_CHECKING:
    import keras

CONFIG = "config.json"
METADATA = "metadata.json"
WEIGHTS = "model.weights.h5"
Group = tuple[str, dict[str, Any] | None, tuple[tuple[str, int], ...]]  # path, metadata, (dataset, weight index)
Signature = tuple[tuple[str, tuple[int, ...], str], ...]  # (path, shape, dtype) of each of model.weights


class _Recorder(saving_lib.NpzIOStore):  # type: ignore[misc]  # Keras ships no types
    """A weights store that keeps what the walk hands it (the variables themselves) and writes nothing."""

    def __init__(self) -> None:  # no file: nothing is opened or written
        self.groups: list[tuple[str, dict[str, Any] | None, dict[str, Any]]] = []

    def make(self, path: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        entries: dict[str, Any] = {}
        self.groups.append((path, metadata, entries))
        return entries


def signature(model: keras.Model) -> Signature:
    return tuple((v.path, tuple(int(d) for d in v.shape), str(v.dtype)) for v in model.weights)


@dataclass(frozen=True)
class Layout:
    """Where a .keras file of one architecture keeps each of `model.weights`."""

    groups: tuple[Group, ...]
    signature: Signature
    nbytes: int  # of all the weights

    @classmethod
    def of(cls, model: keras.Model) -> Layout | None:
        """The layout Keras' walk gives `model`, or None when the walk stores anything but its weights."""
        recorder = _Recorder()
        saving_lib._save_state(model, weights_store=recorder, assets_store=None, inner_path="",
                               visited_saveables=set())
        index = {id(v): i for i, v in enumerate(model.weights)}
        groups: list[Group] = []
        for path, metadata, entries in recorder.groups:
            if any(id(value) not in index for value in entries.values()):
                return None
            groups.append((path, metadata, tuple((name, index[id(value)]) for name, value in entries.items())))
        if sorted(i for _, _, entries in groups for _, i in entries) != list(range(len(index))):
            return None  # every weight exactly once
        return cls(tuple(groups), signature(model), sum(np.asarray(w).nbytes for w in model.get_weights()))

    def h5(self, values: list[np.ndarray]) -> bytes:
        """The weights file of a model with these weights, written as Keras writes it."""
        buffer = io.BytesIO()
        store = saving_lib.H5IOStore(buffer, mode="w")
        try:
            for path, metadata, entries in self.groups:
                group = store.make(path, metadata)
                for name, i in entries:
                    group[name] = values[i]
        finally:
            store.close()
        return buffer.getvalue()

    def read_h5(self, data: bytes) -> list[np.ndarray] | None:
        """The weights in a weights file, read as Keras reads them; None when the file is not laid out so."""
        store = saving_lib.H5IOStore(io.BytesIO(data), mode="r")
        try:
            values: list[Any] = [None] * len(self.signature)
            for path, _, entries in self.groups:
                group = store.get(path)
                if sorted(group.keys()) != sorted(name for name, _ in entries):
                    return None
                for name, i in entries:
                    values[i] = group[name]
        finally:
            store.close()
        if any(tuple(v.shape) != shape for v, (_, shape, _) in zip(values, self.signature, strict=True)):
            return None
        return values


@dataclass(frozen=True)
class Image:
    """A weights file of a layout whose weights lie as plain contiguous arrays, and where."""

    data: bytes
    spans: tuple[tuple[int, int], ...]  # (offset, bytes) of each weight, in model.weights order
    dtypes: tuple[np.dtype[Any], ...]

    @classmethod
    def of(cls, layout: Layout, data: bytes) -> Image | None:
        """`data` (a weights file laid out as `layout`) as an image; None when a weight is stored
        any other way (chunked, filtered, another type or byte order)."""
        spans: list[tuple[int, int]] = [(0, 0)] * len(layout.signature)
        dtypes: list[np.dtype[Any]] = [np.dtype(np.float32)] * len(layout.signature)
        with h5py.File(io.BytesIO(data), "r") as h5:
            for path, _, entries in layout.groups:
                for name, i in entries:
                    dataset = h5[f"{path}/vars/{name}" if path else f"vars/{name}"]
                    _, shape, dtype = layout.signature[i]
                    offset = dataset.id.get_offset()
                    size = int(np.prod(shape, dtype=np.int64)) * dataset.dtype.itemsize
                    if (offset is None or dataset.chunks is not None or dataset.id.get_storage_size() != size
                            or dataset.shape != shape or dataset.dtype != np.dtype(dtype)
                            or not dataset.dtype.isnative):
                        return None
                    spans[i], dtypes[i] = (int(offset), size), dataset.dtype
        ordered = sorted(spans)
        ends = [offset + size for offset, size in ordered]
        starts = [offset for offset, _ in ordered[1:]] + [len(data)]
        if any(end > start for end, start in zip(ends, starts, strict=True)):
            return None  # overlapping, or past the end: not plain arrays
        return cls(data, tuple(spans), tuple(dtypes))

    def with_values(self, values: list[np.ndarray]) -> bytes | None:
        """This file with `values` in place of its weights; None when a value has another type."""
        data = bytearray(self.data)
        for (offset, size), dtype, value in zip(self.spans, self.dtypes, values, strict=True):
            array = np.ascontiguousarray(value)
            if array.dtype != dtype or array.nbytes != size:
                return None
            data[offset:offset + size] = array.tobytes()
        return bytes(data)

    def values(self, data: bytes, signature: Signature) -> list[np.ndarray] | None:
        """The weights in `data`; None unless it agrees with this file outside the weights' bytes."""
        if len(data) != len(self.data):
            return None
        at = 0
        for offset, size in sorted(self.spans):
            if self.data[at:offset] != data[at:offset]:
                return None
            at = offset + size
        if self.data[at:] != data[at:]:
            return None
        return [np.frombuffer(data, dtype, int(np.prod(shape, dtype=np.int64)), offset).reshape(shape).copy()
                for (offset, _), dtype, (_, shape, _) in zip(self.spans, self.dtypes, signature, strict=True)]


class _Known:
    """An architecture's layout and the last weights file of it written or read here."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.image: Image | None = None

    def h5(self, values: list[np.ndarray]) -> bytes:
        image = self.image
        data = image.with_values(values) if image is not None else None
        if data is None:
            data = self.layout.h5(values)
            self.image = Image.of(self.layout, data)
        return data

    def read(self, data: bytes) -> list[np.ndarray] | None:
        image = self.image
        values = image.values(data, self.layout.signature) if image is not None else None
        if values is None:
            values = self.layout.read_h5(data)
            if values is not None:
                self.image = Image.of(self.layout, data)
        return values


_WRITTEN: dict[tuple[str, Signature], _Known | None] = {}
_WRITTEN_KEPT = 16
_WRITTEN_LOCK = threading.Lock()


def dumps(model: keras.Model) -> bytes | None:
    """`model` as the bytes of a .keras file, or None when its architecture has no layout (then
    Keras saves it). The layout is recorded on the first model of an architecture (its config and
    its weights' paths, shapes and types) and replayed for the next ones."""
    config_json, metadata_json = saving_lib._serialize_model_as_json(model)
    key = (config_json, signature(model))
    with _WRITTEN_LOCK:
        seen = key in _WRITTEN
        known = _WRITTEN.get(key)
    if not seen:
        layout = Layout.of(model)
        known = _Known(layout) if layout is not None else None
        with _WRITTEN_LOCK:
            _WRITTEN[key] = known
            while len(_WRITTEN) > _WRITTEN_KEPT:
                del _WRITTEN[next(iter(_WRITTEN))]
    if known is None:
        return None
    data = known.h5(compiled.read_weights(model))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:  # Keras' members, in Keras' order
        archive.writestr(METADATA, metadata_json)
        archive.writestr(CONFIG, config_json)
        archive.writestr(WEIGHTS, data)
    return buffer.getvalue()


class Loaded:
    """A model kept to load the next files of its architecture into (`skyfuse.ml.model.from_bytes`)."""

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        layout = Layout.of(model)
        self.known = _Known(layout) if layout is not None else None

    def load(self, archive: zipfile.ZipFile) -> bool:
        """Set the model's weights from the .keras `archive`; False, having changed nothing, when
        the file is not laid out as this architecture's (Keras' own loader then decides)."""
        if self.known is None:
            return False
        try:
            info = archive.getinfo(WEIGHTS)
        except KeyError:
            return False
        if info.file_size > 2 * self.known.layout.nbytes + (1 << 20):  # more than weights and H5's overhead
            return False
        values = self.known.read(archive.read(WEIGHTS))
        if values is None:
            return False
        compiled.assign_weights(self.model, values)  # as Keras' loader: each variable assigned its dataset
        return True
