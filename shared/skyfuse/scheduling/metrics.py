"""Smoothed per-cloud metrics from `metrics.sampled` data, for the placement policy.

Pure: no I/O and no clock. Every time is a float of seconds since the epoch, taken from the
samples' `sampled_at` or passed in by the caller.

Smoothing is a time-decayed weighted mean with a half-life `h` in seconds:

    value(T) = Σ w_i·x_i·2^(-(T - t_i)/h) / Σ w_i·2^(-(T - t_i)/h)

where `t_i` is a sample's `sampled_at` and `w_i` its `window_s` (a 60 s window counts twice a
30 s one). The ratio does not depend on `T`, so the value is simply "the recent past, older
samples fading by half every `h` seconds". It is robust to missing samples (a gap only makes
the old samples older; it never counts a lost window), to uneven windows, and to samples
that arrive out of order (the sum does not depend on the order, up to float rounding).
The first sample is taken as is (no bias towards zero).

Which sample feeds which figure:

- `requests_per_s`: from `inference` samples (user traffic served); `monitor` samples (probes)
  count only for a cloud that never sent an `inference` sample.
- `p50`/`p99`: smoothed per source from the samples whose latency is not null, and the cloud's
  figure is the worse (higher) of the sources whose newest window had one. `inference` times the
  handler, from the request handed over to the answer ready; `monitor` times its probes from
  outside, connection to last byte, so it also sees the queueing before a busy server even reads
  a request, and it tells the latency of a cloud that serves no traffic. A cloud is as slow as the
  worse of what it measures and what its callers wait; once its server reports an empty window,
  the server's time of its last traffic no longer speaks for it (the probes do). When no source's
  newest window had a latency, the figure is the one heard last.
- `error_rate`: from samples with `requests > 0` (an empty window says nothing about errors).
- `load`: from every sample.
- `cpu_utilisation`, `memory_utilisation`, `network_bytes_per_s` (the serving processes' own
  figures, which the monitor measures): from every sample that carries one (not null); None
  until a cloud reports one.
- price, `capacity_rps`, `replicas`, `model_version`: the latest sample's (by `sampled_at`; a
  price is a fact, not a noisy measure).

A cloud is *stale* when its latest sample is older than `stale_after_s` at the time asked; the
policy treats a stale cloud as down.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from skyfuse.errors import InvalidInput

SOURCES = ("inference", "monitor")
RESOURCES = ("cpu_utilisation", "memory_utilisation", "network_bytes_per_s")  # optional, null when not measured
_Kind = type | tuple[type, ...] | None  # what `isinstance` checks a field against (None: anything)


class SampleError(InvalidInput):
    """A `metrics.sampled` data object that cannot be used; `field` names the culprit."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        self.message = message
        super().__init__(f"field {field_name!r}: {message}")


def parse_time(value: str) -> float:
    """RFC 3339 date-time (`2025-01-14T10:12:30Z`) → seconds since the epoch."""
    if not isinstance(value, str):
        raise ValueError(f"expected an RFC 3339 date-time string, got {value!r}")
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not an RFC 3339 date-time: {value!r}") from None
    if stamp.tzinfo is None:
        raise ValueError(f"date-time {value!r} has no offset; add Z or +00:00")
    return stamp.timestamp()


def format_time(t: float) -> str:
    """Seconds since the epoch → RFC 3339 UTC (`2025-01-14T10:12:30Z`; fractions only when present)."""
    stamp = datetime.fromtimestamp(t, tz=UTC)
    text = stamp.isoformat(timespec="milliseconds" if stamp.microsecond else "seconds")
    return text.replace("+00:00", "Z")


@dataclass(frozen=True)
class Sample:
    """One `metrics.sampled` data object, typed. `t` is `sampled_at` in epoch seconds."""

    cloud: str
    source: str
    t: float
    window_s: float
    requests: int
    requests_per_s: float
    p50: float | None
    p99: float | None
    error_rate: float
    load: float
    price_per_hour: float
    price_per_million_requests: float
    currency: str = "USD"
    capacity_rps: float | None = None
    replicas: int | None = None
    model_version: str | None = None
    cpu_utilisation: float | None = None
    memory_utilisation: float | None = None
    network_bytes_per_s: float | None = None

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Sample:
        """Read event data; raises `SampleError` naming the first missing or bad field.

        Only what the policy relies on is checked here (the JSON Schema is the full contract;
        `simulate.load_trace` applies it)."""
        if not isinstance(data, Mapping):
            raise SampleError("(root)", f"expected a JSON object, got {type(data).__name__}")

        def need(name: str, kind: _Kind = (int, float), parent: Mapping[str, Any] | None = None,
                 path: str | None = None) -> Any:
            src = data if parent is None else parent
            path = path or name
            if name not in src:
                raise SampleError(path, "missing")
            value = src[name]
            if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise SampleError(path, f"expected {_kind_name(kind)}, got {value!r}")
            return value

        def number(name: str, parent: Mapping[str, Any] | None = None, path: str | None = None, *,
                   lo: float = 0.0, hi: float | None = None) -> float:
            value = float(need(name, parent=parent, path=path))
            if not math.isfinite(value) or value < lo or (hi is not None and value > hi):
                bounds = f">= {lo}" + (f" and <= {hi}" if hi is not None else "")
                raise SampleError(path or name, f"must be a finite number {bounds}, got {value!r}")
            return value

        def number_or_null(name: str, parent: Mapping[str, Any] | None = None, path: str | None = None, *,
                           hi: float | None = None) -> float | None:
            src = data if parent is None else parent
            return None if src.get(name, 0) is None else number(name, parent, path, hi=hi)

        cloud = need("cloud", str)
        source = need("source", str)
        if source not in SOURCES:
            raise SampleError("source", f"must be one of {', '.join(SOURCES)}, got {source!r}")
        try:
            t = parse_time(need("sampled_at", str))
        except ValueError as exc:
            raise SampleError("sampled_at", str(exc)) from None
        window_s = number("window_s")
        if window_s <= 0:
            raise SampleError("window_s", f"must be > 0, got {window_s!r}")
        requests = need("requests", int)
        if requests < 0:
            raise SampleError("requests", f"must be >= 0, got {requests!r}")
        latency = need("latency_ms", Mapping)
        p50 = number_or_null("p50", latency, "latency_ms.p50")
        p99 = number_or_null("p99", latency, "latency_ms.p99")
        price = need("price", Mapping)
        capacity = data.get("capacity_rps")
        replicas = data.get("replicas")
        if capacity is not None:
            capacity = number("capacity_rps")
        if replicas is not None:
            replicas = need("replicas", int)
        cpu = number_or_null("cpu_utilisation", hi=1.0) if "cpu_utilisation" in data else None
        memory = number_or_null("memory_utilisation", hi=1.0) if "memory_utilisation" in data else None
        network = number_or_null("network_bytes_per_s") if "network_bytes_per_s" in data else None
        return cls(
            cloud=cloud, source=source, t=t, window_s=window_s, requests=requests,
            requests_per_s=number("requests_per_s"), p50=p50, p99=p99,
            error_rate=number("error_rate", hi=1.0), load=number("load", hi=1.0),
            price_per_hour=number("per_hour", price, "price.per_hour"),
            price_per_million_requests=number("per_million_requests", price, "price.per_million_requests"),
            currency=price.get("currency", "USD") if isinstance(price.get("currency", "USD"), str) else "USD",
            capacity_rps=capacity, replicas=replicas,
            model_version=data.get("model_version") if isinstance(data.get("model_version"), str) else None,
            cpu_utilisation=cpu, memory_utilisation=memory, network_bytes_per_s=network,
        )

    def to_data(self) -> dict[str, Any]:
        """Back to `metrics.sampled` data (what `from_data` read)."""
        data: dict[str, Any] = {
            "cloud": self.cloud, "source": self.source, "window_s": self.window_s,
            "sampled_at": format_time(self.t), "requests": self.requests, "requests_per_s": self.requests_per_s,
            "latency_ms": {"p50": self.p50, "p99": self.p99}, "error_rate": self.error_rate, "load": self.load,
            "price": {"per_hour": self.price_per_hour, "per_million_requests": self.price_per_million_requests,
                      "currency": self.currency},
        }
        if self.capacity_rps is not None:
            data["capacity_rps"] = self.capacity_rps
        if self.replicas is not None:
            data["replicas"] = self.replicas
        if self.model_version is not None:
            data["model_version"] = self.model_version
        for name in RESOURCES:
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        return data


def _kind_name(kind: _Kind) -> str:
    if kind == (int, float):
        return "a number"
    names: dict[_Kind, str] = {int: "an integer", str: "a string", Mapping: "an object"}
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def as_sample(item: Sample | Mapping[str, Any]) -> Sample:
    return item if isinstance(item, Sample) else Sample.from_data(item)


class Ewma:
    """Time-decayed weighted mean with a half-life in seconds (see the module doc)."""

    __slots__ = ("half_life_s", "t", "_sum", "_weight")

    def __init__(self, half_life_s: float):
        if half_life_s <= 0:
            raise ValueError("half_life_s must be > 0")
        self.half_life_s = half_life_s
        self.t: float | None = None  # time of the newest sample
        self._sum = 0.0
        self._weight = 0.0

    def add(self, t: float, x: float, weight: float = 1.0) -> None:
        if weight <= 0:
            return
        if self.t is None:
            self.t, self._sum, self._weight = t, weight * x, weight
        elif t >= self.t:
            decay = 2.0 ** (-(t - self.t) / self.half_life_s)
            self._sum = self._sum * decay + weight * x
            self._weight = self._weight * decay + weight
            self.t = t
        else:  # late sample: it enters already faded, the newer state is not decayed
            decay = 2.0 ** (-(self.t - t) / self.half_life_s)
            self._sum += weight * decay * x
            self._weight += weight * decay

    @property
    def value(self) -> float | None:
        return None if self.t is None else self._sum / self._weight

    def to_data(self) -> list[float | None]:
        return [self.t, self._sum, self._weight]

    @classmethod
    def from_data(cls, half_life_s: float, data: Sequence[Any]) -> Ewma:
        """From `to_data`'s [t, sum, weight], as read back from JSON."""
        ewma = cls(half_life_s)
        ewma.t, ewma._sum, ewma._weight = data[0], float(data[1]), float(data[2])
        return ewma


@dataclass
class CloudMetrics:
    """What is known of one cloud: smoothed measures and its latest facts."""

    cloud: str
    half_life_s: float
    rps: dict[str, Ewma] = field(default_factory=dict)  # per source
    p50: dict[str, Ewma] = field(default_factory=dict)  # per source
    p99: dict[str, Ewma] = field(default_factory=dict)  # per source
    error_rate: Ewma = None  # type: ignore[assignment]
    load: Ewma = None  # type: ignore[assignment]
    resources: dict[str, Ewma] = field(default_factory=dict)  # RESOURCES name → smoothed, once reported
    last_seen: float | None = None
    last_source_seen: dict[str, float] = field(default_factory=dict)
    latest: Sample | None = None  # newest by sampled_at
    samples: int = 0

    def __post_init__(self) -> None:
        for name in ("error_rate", "load"):
            if getattr(self, name) is None:
                setattr(self, name, Ewma(self.half_life_s))

    def observe(self, s: Sample) -> None:
        w = s.window_s
        self.rps.setdefault(s.source, Ewma(self.half_life_s)).add(s.t, s.requests_per_s, w)
        if s.p50 is not None:
            self.p50.setdefault(s.source, Ewma(self.half_life_s)).add(s.t, s.p50, w)
        if s.p99 is not None:
            self.p99.setdefault(s.source, Ewma(self.half_life_s)).add(s.t, s.p99, w)
        if s.requests > 0:
            self.error_rate.add(s.t, s.error_rate, w)
        self.load.add(s.t, s.load, w)
        for name in RESOURCES:
            value = getattr(s, name)
            if value is not None:
                self.resources.setdefault(name, Ewma(self.half_life_s)).add(s.t, value, w)
        self.samples += 1
        if self.last_seen is None or s.t >= self.last_seen:
            self.last_seen = s.t
            self.latest = s
        if s.t >= self.last_source_seen.get(s.source, -math.inf):
            self.last_source_seen[s.source] = s.t

    def to_data(self) -> dict[str, Any]:
        return {"rps": {k: v.to_data() for k, v in self.rps.items()},
                "p50": {k: v.to_data() for k, v in self.p50.items()},
                "p99": {k: v.to_data() for k, v in self.p99.items()},
                "error_rate": self.error_rate.to_data(), "load": self.load.to_data(),
                "resources": {k: v.to_data() for k, v in self.resources.items()},
                "last_seen": self.last_seen, "last_source_seen": dict(self.last_source_seen),
                "latest": self.latest.to_data() if self.latest else None, "samples": self.samples}

    @classmethod
    def from_data(cls, cloud: str, half_life_s: float, data: Mapping[str, Any]) -> CloudMetrics:
        def ewma(name: str) -> Ewma:
            return Ewma.from_data(half_life_s, data[name])

        def per_source(name: str) -> dict[str, Ewma]:
            saved = data[name]
            if not isinstance(saved, Mapping):  # saved before latency was kept per source
                saved = {"inference": saved} if saved[0] is not None else {}
            return {k: Ewma.from_data(half_life_s, v) for k, v in saved.items()}

        latest = Sample.from_data(data["latest"]) if data.get("latest") else None
        if latest is not None and data.get("last_seen") is not None:
            latest = replace(latest, t=data["last_seen"])  # as counted (the clock may have bounded it)
        return cls(cloud, half_life_s, rps={k: Ewma.from_data(half_life_s, v) for k, v in data["rps"].items()},
                   p50=per_source("p50"), p99=per_source("p99"), error_rate=ewma("error_rate"), load=ewma("load"),
                   resources={k: Ewma.from_data(half_life_s, v) for k, v in data.get("resources", {}).items()},
                   last_seen=data.get("last_seen"), last_source_seen=dict(data.get("last_source_seen", {})),
                   latest=latest, samples=int(data.get("samples", 0)))

    def view(self, now: float, stale_after_s: float) -> CloudView:
        source = "inference" if "inference" in self.rps else "monitor"
        latest = self.latest
        age = now - self.last_seen if self.last_seen is not None else math.inf
        traffic_age = now - self.last_source_seen.get(source, -math.inf)
        return CloudView(
            cloud=self.cloud,
            requests_per_s=(self.rps[source].value or 0.0) if source in self.rps else 0.0,
            traffic_fresh=traffic_age <= stale_after_s,
            p50_ms=_worst(self.p50, self.last_source_seen), p99_ms=_worst(self.p99, self.last_source_seen),
            error_rate=self.error_rate.value or 0.0, load=self.load.value or 0.0,
            **{name: self.resources[name].value if name in self.resources else None for name in RESOURCES},
            price_per_hour=latest.price_per_hour if latest else None,
            price_per_million_requests=latest.price_per_million_requests if latest else None,
            capacity_rps=latest.capacity_rps if latest else None,
            replicas=latest.replicas if latest else None,
            last_seen=self.last_seen, age_s=age, stale=age > stale_after_s, samples=self.samples,
        )


def _worst(per_source: Mapping[str, Ewma], last_seen: Mapping[str, float]) -> float | None:
    """The worse of the sources whose newest window had a latency; when none had (no traffic, no
    probe answered), the one heard from last."""
    known = {source: (e.t, e.value) for source, e in per_source.items() if e.t is not None and e.value is not None}
    current = [value for source, (t, value) in known.items() if t >= last_seen.get(source, -math.inf)]
    if current:
        return max(current)
    newest = max(known.values(), key=lambda reading: reading[0], default=None)  # (t, value) heard last
    return newest[1] if newest else None


@dataclass(frozen=True)
class CloudView:
    """A cloud's smoothed metrics as of `now` (see `MetricsState.view`)."""

    cloud: str
    requests_per_s: float
    traffic_fresh: bool  # the traffic figure was reported within stale_after_s
    p50_ms: float | None
    p99_ms: float | None
    error_rate: float
    load: float
    cpu_utilisation: float | None  # the serving processes' own figures, smoothed; None: never reported
    memory_utilisation: float | None
    network_bytes_per_s: float | None
    price_per_hour: float | None
    price_per_million_requests: float | None
    capacity_rps: float | None
    replicas: int | None
    last_seen: float | None
    age_s: float
    stale: bool
    samples: int


class MetricsState:
    """Every cloud's smoothed metrics. Feed it samples with `observe`; read with `view`."""

    def __init__(self, half_life_s: float = 120.0):
        if half_life_s <= 0:
            raise ValueError("half_life_s must be > 0")
        self.half_life_s = half_life_s
        self.clouds: dict[str, CloudMetrics] = {}
        self.last_t: float | None = None

    def observe(self, item: Sample | Mapping[str, Any]) -> Sample:
        """Take one sample (a `Sample` or `metrics.sampled` data); returns it typed."""
        s = as_sample(item)
        metrics = self.clouds.get(s.cloud)
        if metrics is None:
            metrics = self.clouds[s.cloud] = CloudMetrics(s.cloud, self.half_life_s)
        metrics.observe(s)
        self.last_t = s.t if self.last_t is None else max(self.last_t, s.t)
        return s

    def observe_all(self, items: Iterable[Sample | Mapping[str, Any]]) -> None:
        for item in items:
            self.observe(item)

    def to_data(self) -> dict[str, Any]:
        """Everything observed, JSON-ready: `from_data` restores it exactly (a restarted
        scheduler smooths on as if it had never stopped)."""
        return {"half_life_s": self.half_life_s, "last_t": self.last_t,
                "clouds": {name: m.to_data() for name, m in self.clouds.items()}}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> MetricsState:
        state = cls(float(data["half_life_s"]))
        state.last_t = data.get("last_t")
        state.clouds = {name: CloudMetrics.from_data(name, state.half_life_s, m) for name, m in data["clouds"].items()}
        return state

    def view(self, cloud: str, now: float, stale_after_s: float) -> CloudView | None:
        """The cloud's metrics as of `now`, or None when it never reported."""
        metrics = self.clouds.get(cloud)
        return metrics.view(now, stale_after_s) if metrics else None
