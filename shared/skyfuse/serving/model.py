"""The served model: a verified, warmed onnxruntime session, the slot that holds it, and the
watcher that swaps in whatever the serving pointer names.

onnxruntime and numpy only: this module never imports TensorFlow (nor the `onnx` package; the
lineage is read from the session's own model metadata).

The serving pointer is a JSON object at `serving/current.json` in the cloud's store:

    {"version": "r1-wavg-3f2a1c", "uri": "file:///…/serving/models/r1-wavg-3f2a1c.onnx", "sha256": "…"}

`uri` is a full object URI (any store `skyfuse.storage.fetch` reads) or a key in the same store
(`serving/models/r1-wavg-3f2a1c.onnx`). Write the model first, then the pointer (each `put` is
atomic): a reader then never sees a pointer to a missing or half-written model.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from skyfuse.errors import Failure
from skyfuse.redact import redact
from skyfuse.serving.onnx_refs import refuse_external_data
from skyfuse.serving.session import open_session
from skyfuse.storage import NotFound, Store, StoreError, fetch, sha256_of

POINTER_KEY = "serving/current.json"
MODELS_PREFIX = "serving/models/"
LINEAGE_KEY = "skyfuse.lineage"
OUTPUT = "prob"
WARMUP_BATCHES = (1, 64)
_ID = re.compile(r"^(?!\.\.?$)[^\s/]{1,128}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

log = logging.getLogger("skyfuse.serving")


class ModelError(Failure):
    """A model (or pointer) that cannot be served; the message says exactly why."""


def model_key(version: str) -> str:
    """Where a deployer writes a model version in a cloud's store."""
    return f"{MODELS_PREFIX}{version}.onnx"


@dataclass(frozen=True)
class Pointer:
    version: str
    uri: str
    sha256: str
    traceparent: str | None = None  # the deploy's span: the first prediction's span is its child

    @classmethod
    def parse(cls, raw: bytes, where: str = POINTER_KEY) -> Pointer:
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise ModelError(f"serving pointer {where} is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ModelError(f"serving pointer {where} must be a JSON object, got {type(doc).__name__}")
        missing = [k for k in ("version", "uri", "sha256") if k not in doc]
        if missing:
            raise ModelError(f"serving pointer {where} lacks {', '.join(missing)}; "
                             'expected {"version", "uri", "sha256"}')
        version, uri, sha = doc["version"], doc["uri"], doc["sha256"]
        if not isinstance(version, str) or not _ID.match(version):
            raise ModelError(f"serving pointer {where}: version {version!r} must be 1-128 characters, "
                             "no whitespace or '/'")
        if not isinstance(uri, str) or not uri:
            raise ModelError(f"serving pointer {where}: uri must be a non-empty string, got {uri!r}")
        if not isinstance(sha, str) or not _SHA256.match(sha):
            raise ModelError(f"serving pointer {where}: sha256 must be 64 lowercase hex digits, got {sha!r}")
        traceparent = doc.get("traceparent")
        return cls(version, uri, sha, traceparent if isinstance(traceparent, str) and len(traceparent) <= 64 else None)

    def to_json(self) -> bytes:
        doc = {"version": self.version, "uri": self.uri, "sha256": self.sha256}
        if self.traceparent:
            doc["traceparent"] = self.traceparent
        return json.dumps(doc).encode()


class LoadedModel:
    """An ONNX classifier ready to serve: `features` float32 [N, width] → `prob` float32 [N, k].

    Built from bytes: the digest is checked, the session created, the signature checked against
    the lineage (`features`, `classes` in the `skyfuse.lineage` metadata), then warmed up on zero
    rows. Any problem raises `ModelError`; a LoadedModel that exists can serve.
    """

    __slots__ = ("version", "sha256", "uri", "size", "session", "input_name", "output_names", "width",
                 "classes", "labels", "features", "lineage", "metadata", "loaded_at", "load_ms", "traceparent")

    def __init__(self, data: bytes, version: str, sha256: str | None = None, uri: str | None = None,
                 threads: int = 1):
        started = time.perf_counter()
        digest = sha256_of(data)
        if sha256 is not None and digest != sha256:
            raise ModelError(f"model {version} ({uri or 'bytes'}) has sha256 {digest}, expected {sha256}: "
                             "the object changed or was corrupted after it was announced")
        self.version, self.sha256, self.uri, self.size = version, digest, uri, len(data)
        self.traceparent: str | None = None  # of the deploy that served it (from the pointer)
        try:
            refuse_external_data(data, f"model {version}")  # before onnxruntime could open any file
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        try:
            self.session = open_session(data, threads)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelError(f"model {version} is not a loadable ONNX model: {str(exc).strip()[:500]}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise ModelError(f"model {version} has {len(inputs)} inputs "
                             f"({', '.join(i.name for i in inputs)}); one float32 [N, d] input is needed")
        given = inputs[0]
        if given.type != "tensor(float)" or len(given.shape) != 2 or not isinstance(given.shape[1], int) \
                or given.shape[1] < 1:
            raise ModelError(f"model {version}: input {given.name!r} is {given.type} {given.shape}; "
                             "a float32 [N, d] input with a fixed width d is needed")
        self.input_name, self.width = given.name, int(given.shape[1])
        names = [o.name for o in outputs]
        self.output_names = [OUTPUT if OUTPUT in names else names[0]]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        raw_lineage = self.metadata.get(LINEAGE_KEY)
        try:
            self.lineage = json.loads(raw_lineage) if raw_lineage else {}
        except ValueError as exc:
            raise ModelError(f"model {version}: metadata {LINEAGE_KEY} is not JSON: {exc}") from None
        if not isinstance(self.lineage, dict):
            raise ModelError(f"model {version}: metadata {LINEAGE_KEY} must be a JSON object")
        features = self.lineage.get("features")
        if features is not None and (not isinstance(features, list) or len(features) != self.width):
            named = len(features) if isinstance(features, list) else repr(features)
            raise ModelError(f"model {version}: the lineage names {named} features but the model input "
                             f"{self.input_name!r} takes {self.width}")
        self.features = [str(f) for f in features] if features else None
        k = self._warm_up()
        classes = self.lineage.get("classes")
        if classes is not None and (not isinstance(classes, list) or len(classes) != k):
            named = len(classes) if isinstance(classes, list) else repr(classes)
            raise ModelError(f"model {version}: the lineage names {named} classes but the model outputs "
                             f"{k} probabilities per row")
        self.classes = list(classes) if classes else list(range(k))
        self.labels = [str(c) for c in self.classes]
        self.loaded_at = time.time()
        self.load_ms = round((time.perf_counter() - started) * 1000, 3)

    def _warm_up(self) -> int:
        k = 0  # the classes of the last batch's output (WARMUP_BATCHES is never empty)
        for n in WARMUP_BATCHES:
            try:
                out = self.run(np.zeros((n, self.width), dtype=np.float32))
            except Exception as exc:  # noqa: BLE001
                raise ModelError(f"model {self.version} fails on a zero batch of {n} x {self.width}: "
                                 f"{str(exc).strip()[:500]}") from None
            if out.ndim != 2 or out.shape[0] != n:
                raise ModelError(f"model {self.version}: output {self.output_names[0]!r} has shape {list(out.shape)} "
                                 f"for {n} rows; [N, classes] is needed")
            if not np.isfinite(out).all():
                raise ModelError(f"model {self.version}: output is not finite on zero rows (NaN or Infinity)")
            k = int(out.shape[1])
        return k

    def run(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, float32 [N, k], for float32 C-contiguous X [N, width]."""
        probs: np.ndarray = self.session.run(self.output_names, {self.input_name: X})[0]
        return probs

    def describe(self) -> dict[str, Any]:
        return {
            "model_version": self.version, "sha256": self.sha256, "uri": self.uri, "size_bytes": self.size,
            "loaded_at": _iso(self.loaded_at), "load_ms": self.load_ms,
            "input": {"name": self.input_name, "dtype": "float32", "width": self.width, "features": self.features},
            "output": {"name": self.output_names[0], "classes": self.labels},
            "lineage": self.lineage,
        }


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


class ModelSlot:
    """Holds the model being served. Readers take `slot.model` ONCE per request and use that
    reference throughout; `swap` replaces the reference in one step, so a request sees the old
    model or the new one, never a mix. The old session is freed when its last request ends."""

    def __init__(self, source: str = POINTER_KEY):
        self.model: LoadedModel | None = None
        self.source = source  # where the pointer lives, for messages
        self.swaps = 0
        self.last_error: dict[str, str | None] | None = None
        self.pointer_seen: bool | None = None  # None: not checked yet; False: no pointer in the store
        self._write = threading.Lock()

    def swap(self, new: LoadedModel) -> LoadedModel | None:
        with self._write:
            old, self.model = self.model, new
            self.swaps += 1
            self.last_error = None
        return old

    def fail(self, error: str, version: str | None = None, uri: str | None = None) -> None:
        with self._write:
            self.last_error = {"at": _iso(time.time()), "version": version, "uri": uri, "error": redact(error)}

    def status(self) -> dict[str, Any]:
        model = self.model
        return {
            "status": "ok" if model else "no_model",
            "model_version": model.version if model else None,
            "sha256": model.sha256 if model else None,
            "loaded_at": _iso(model.loaded_at) if model else None,
            "swaps": self.swaps,
            "pointer": self.source,
            "pointer_found": self.pointer_seen,
            # /health is open to anyone: when and which version failed, never the error's text
            # (GET /metadata, behind the API keys, has it)
            "last_error": ({k: self.last_error[k] for k in ("at", "version")} | {"error": "see GET /metadata"}
                           if self.last_error else None),
        }


def publish(store: Store, version: str, data: bytes, traceparent: str | None = None) -> Pointer:
    """What a deployer does to serve `data` as `version` in this store: write the model at
    `serving/models/<version>.onnx`, then the pointer `serving/current.json` naming it (model first,
    so the pointer never names a missing object). Every instance swaps within its poll interval."""
    info = store.put(model_key(version), data)
    pointer = Pointer.parse(json.dumps({"version": version, "uri": info.uri, "sha256": info.sha256,
                                        "traceparent": traceparent}).encode())
    store.put(POINTER_KEY, pointer.to_json())
    return pointer


def read_model(store: Store, pointer: Pointer) -> bytes:
    """The bytes the pointer names, verified against its sha256."""
    if "://" in pointer.uri:
        return fetch(pointer.uri, pointer.sha256)
    return store.get(pointer.uri, pointer.sha256)


def load_from_pointer(store: Store, key: str = POINTER_KEY, threads: int = 1) -> LoadedModel:
    """Read the pointer at `key`, fetch, verify, load and warm the model it names."""
    pointer = Pointer.parse(store.read(key), store.uri_for(key))
    return load_pointer(store, pointer, threads)


def load_pointer(store: Store, pointer: Pointer, threads: int = 1) -> LoadedModel:
    try:
        data = read_model(store, pointer)
    except StoreError as exc:
        raise ModelError(f"model {pointer.version} at {pointer.uri} cannot be read: {exc}") from None
    model = LoadedModel(data, pointer.version, pointer.sha256, pointer.uri, threads)
    model.traceparent = pointer.traceparent
    return model


class PointerWatcher(threading.Thread):
    """Polls the serving pointer; loads, verifies and warms a new model off the request path, then
    swaps it in. A failure (unreadable pointer, missing object, bad sha256, not ONNX, wrong shape)
    keeps the current model serving and is recorded in `slot.last_error`; a pointer that failed is
    tried again only when it changes or after `retry_failed_s`."""

    def __init__(self, slot: ModelSlot, store: Store, key: str = POINTER_KEY, interval_s: float = 0.5,
                 threads: int = 1, retry_failed_s: float = 30.0,
                 on_swap: Callable[[LoadedModel, LoadedModel | None], None] | None = None,
                 on_fail: Callable[[str | None, str], None] | None = None):
        super().__init__(name="skyfuse-pointer-watcher", daemon=True)
        self.slot, self.store, self.key = slot, store, key
        self.interval_s, self.threads, self.retry_failed_s = interval_s, threads, retry_failed_s
        self.on_swap, self.on_fail = on_swap, on_fail  # (new, old) after a swap; (version, error) when one fails
        self._stop_event = threading.Event()
        self._settled: bytes | None = None  # pointer bytes that need no more work
        self._failed: tuple[bytes, float] | None = None  # (pointer bytes, retry after monotonic time)
        self.checks = 0

    def check_once(self) -> bool:
        """One poll; True when a new model was swapped in."""
        self.checks += 1
        try:
            raw = self.store.read(self.key)
        except NotFound:
            self.slot.pointer_seen = False
            return False
        except StoreError as exc:
            self.slot.fail(f"serving pointer {self.slot.source} cannot be read: {exc}")
            return False
        self.slot.pointer_seen = True
        if raw == self._settled:
            return False
        if self._failed and self._failed[0] == raw and time.monotonic() < self._failed[1]:
            return False
        pointer = None
        try:
            pointer = Pointer.parse(raw, self.slot.source)
            current = self.slot.model
            if current is not None and current.version == pointer.version and current.sha256 == pointer.sha256:
                self._settled = raw
                return False
            model = load_pointer(self.store, pointer, self.threads)
        except ModelError as exc:
            self._failed = (raw, time.monotonic() + self.retry_failed_s)
            self.slot.fail(str(exc), pointer.version if pointer else None, pointer.uri if pointer else None)
            log.warning("model not swapped in: %s", exc, extra={"pointer": self.slot.source})
            if self.on_fail:
                self.on_fail(pointer.version if pointer else None, str(exc))
            return False
        old = self.slot.swap(model)
        self._settled, self._failed = raw, None
        log.info("serving model %s (was %s), loaded in %.1f ms", model.version,
                 old.version if old else None, model.load_ms)
        if self.on_swap:
            self.on_swap(model, old)
        return True

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                self.check_once()
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive any one bad poll
                self.slot.fail(f"pointer watcher error: {type(exc).__name__}: {exc}")
                log.exception("pointer watcher error")

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
