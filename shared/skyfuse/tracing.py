"""OpenTelemetry traces from the W3C `traceparent` every event carries: one run, one trace.

Every function's consumption of an event is a CONSUMER span, `<function> process <type>`, child of
the span that published the event; every event a function emits is published inside a PRODUCER
span, `<function> publish <type>`, child of the span it was emitted in, and the event's
`traceparent` is rewritten to that span before it is signed (the signature does not cover it). So
`shard.ready` → trainer → exporter → fuser → scheduler → deployer is one parent-child chain, in
whichever cloud each step ran. The inference server closes it with the span of the first prediction
a new model serves (`FirstPrediction`).

Off by default: with no endpoint configured the API's no-op tracer is used, which records nothing
and passes the parent's context on, so events still carry their run's trace id, as before. With
`[tracing] otlp_endpoint` (SKYFUSE_TRACING__OTLP_ENDPOINT), or the standard
OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, spans go through a BatchSpanProcessor to the OTLP/HTTP
exporter (opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http, the `otlp` extra).

One process hosts many clouds locally, so the resource says only `service.name` (`skyfuse`); the
cloud and function are attributes of each span (cloud.provider, cloud.region, faas.name,
skyfuse.cloud). The provider is this module's own, never the global one: `installed(provider)` puts
another in its place (tests use the SDK's in-memory exporter through it).
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from skyfuse.errors import Failure

if TYPE_CHECKING:
    from cloudevents.http import CloudEvent
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.util.types import AttributeValue

    from skyfuse.config import Fleet

log = logging.getLogger("skyfuse.tracing")

TRACER = "skyfuse"
OTLP_PACKAGES = "opentelemetry-sdk opentelemetry-exporter-otlp-proto-http"
OUTCOMES = ("handled", "rejected", "untrusted", "deferred", "failed")

_propagator = TraceContextTextMapPropagator()
_NOOP = trace.NoOpTracer()
_lock = threading.Lock()
_installed: trace.TracerProvider | None = None  # set by `installed`: wins over the config
_providers: dict[str, SdkTracerProvider] = {}  # exporter endpoint → the provider built for it
_tracers: dict[int, trace.Tracer] = {}  # id(provider) → its skyfuse tracer
_refused: set[str] = set()  # endpoints whose provider could not be built (said once, then off)


class TracingSetupError(Failure, RuntimeError):
    """Tracing is configured but cannot be set up; the message says what to install or change."""


# -- the provider ---------------------------------------------------------------------------------

def endpoint(fleet: Fleet | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """Where spans go: the OTLP/HTTP traces URL, `env` when only the standard OTEL_* variables say
    (the exporter reads them itself), or None: tracing off."""
    environ = os.environ if environ is None else environ
    settings = getattr(fleet, "tracing", None)
    configured = (settings.otlp_endpoint if settings is not None else "").strip().rstrip("/")
    if configured:
        url = configured if configured.endswith("/v1/traces") else f"{configured}/v1/traces"
    elif environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        url = "env"
    else:
        return None  # asked first: every event consumed asks
    return None if str(environ.get("OTEL_SDK_DISABLED", "")).lower() == "true" else url


def resource(service_name: str = "skyfuse") -> Resource:
    """The SDK resource of every skyfuse span: the service, plus OTEL_RESOURCE_ATTRIBUTES."""
    from opentelemetry.sdk.resources import Resource

    return Resource.create({"service.name": service_name})


def sdk_provider(service_name: str = "skyfuse") -> SdkTracerProvider:
    """An SDK TracerProvider for skyfuse spans, with no processor yet. Its span and trace ids come
    from the OS's random source, not from the `random` module: the trainers seed that one (Keras'
    `set_random_seed`), which would give every cloud's trainer the same ids."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.id_generator import IdGenerator

    class SystemRandomIds(IdGenerator):
        def generate_span_id(self) -> int:
            span_id = secrets.randbits(64)
            while span_id == 0:
                span_id = secrets.randbits(64)
            return span_id

        def generate_trace_id(self) -> int:
            trace_id = secrets.randbits(128)
            while trace_id == 0:
                trace_id = secrets.randbits(128)
            return trace_id

    return TracerProvider(resource=resource(service_name), id_generator=SystemRandomIds())


def _shown(url: str) -> str:
    """`url` without a user or password in it, for messages."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl() \
        if parts.hostname and "@" in parts.netloc else url


def build_provider(url: str, service_name: str = "skyfuse") -> SdkTracerProvider:
    """An SDK provider exporting to `url` (`env`: the OTEL_EXPORTER_OTLP_* variables) in batches."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        where = "OTEL_EXPORTER_OTLP_ENDPOINT" if url == "env" else f"tracing.otlp_endpoint ({_shown(url)})"
        raise TracingSetupError(
            f"{where} asks for OpenTelemetry traces, but {exc.name or 'an OpenTelemetry package'} is not installed: "
            f"pip install {OTLP_PACKAGES} (the skyfuse `otlp` extra), or unset it to turn tracing off") from None
    provider = sdk_provider(service_name)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=None if url == "env" else url)))
    return provider


def configure(fleet: Fleet | None = None) -> SdkTracerProvider | None:
    """The provider `fleet`'s settings ask for, built once per endpoint (None: tracing off).
    Raises `TracingSetupError` when the exporter's packages are missing."""
    url = endpoint(fleet)
    if url is None:
        return None
    with _lock:
        provider = _providers.get(url)
        if provider is None:
            settings = getattr(fleet, "tracing", None)
            provider = _providers[url] = build_provider(url, settings.service_name if settings else "skyfuse")
    return provider


def tracer(fleet: Fleet | None = None) -> trace.Tracer:
    """The tracer for spans of `fleet`'s functions: the installed provider's, the configured
    exporter's, or the no-op tracer. A tracing setup that fails is logged once, then left off:
    a missing exporter never stops the events."""
    provider: trace.TracerProvider | None = _installed
    if provider is None:
        url = endpoint(fleet)
        if url is None or url in _refused:
            return _NOOP
        try:
            provider = configure(fleet)
        except TracingSetupError as exc:
            _refused.add(url)
            log.error("tracing off: %s", exc)
            return _NOOP
        if provider is None:
            return _NOOP
    found = _tracers.get(id(provider))
    if found is None:
        found = _tracers[id(provider)] = provider.get_tracer(TRACER)
    return found


@contextlib.contextmanager
def installed(provider: trace.TracerProvider) -> Iterator[trace.TracerProvider]:
    """Use `provider` for every span of this process for the block, whatever the config says
    (threads too: it is process-wide, not per context)."""
    global _installed
    with _lock:
        previous, _installed = _installed, provider
    try:
        yield provider
    finally:
        with _lock:
            _installed = previous
            _tracers.pop(id(provider), None)


def flush(timeout_ms: int = 5000) -> None:
    """Export what the configured providers hold now: call it at the end of an invocation where the
    cloud may freeze the process before the batch goes (AWS Lambda)."""
    with _lock:
        providers = list(_providers.values())
    for provider in providers:
        provider.force_flush(timeout_ms)


def shutdown() -> None:
    """Flush and close the providers built from the config (also done at exit by the SDK)."""
    with _lock:
        providers = list(_providers.values())
        _providers.clear()
        _refused.clear()
        _tracers.clear()
    for provider in providers:
        provider.shutdown()


# -- context ------------------------------------------------------------------------------------

def extract(traceparent: str | None) -> Context:
    """The context whose current span is the remote one `traceparent` names (empty if none/invalid)."""
    return _propagator.extract({"traceparent": traceparent}) if traceparent else Context()


def span_context(traceparent: str | None) -> SpanContext:
    return trace.get_current_span(extract(traceparent)).get_span_context()


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, None when there is none (e.g. for a serving pointer)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


def _attributes(fleet: Fleet | None, function: str, cloud: str | None,
                event: CloudEvent) -> dict[str, AttributeValue]:
    from skyfuse import contracts

    kind = contracts.event_type(event["type"])
    attributes: dict[str, AttributeValue] = {
        "messaging.system": "kafka",
        "messaging.destination.name": kind.topic,
        "messaging.message.id": event["id"],
        "cloudevents.event_id": event["id"],
        "cloudevents.event_type": event["type"],
        "cloudevents.event_source": event["source"],
        "faas.name": function,
    }
    if event.get("subject"):
        attributes["cloudevents.event_subject"] = event["subject"]
    run_id = (event.get_data() or {}).get("run_id") if isinstance(event.get_data(), dict) else None
    if run_id:
        attributes["skyfuse.run_id"] = str(run_id)
    settings = fleet.clouds.get(cloud) if cloud and fleet is not None else None
    if cloud:
        attributes["skyfuse.cloud"] = cloud
    if settings is not None:
        attributes["cloud.provider"] = settings.provider
        attributes["cloud.region"] = settings.region
    return attributes


def _short(type_name: str) -> str:
    from skyfuse import contracts

    return type_name.removeprefix(contracts.TYPE_PREFIX)


# -- spans of functions ---------------------------------------------------------------------------

def consuming(event: CloudEvent, fleet: Fleet | None, function: str, cloud: str,
              trusted: bool = True) -> contextlib.AbstractContextManager[Span]:
    """The CONSUMER span of `function` in `cloud` processing `event`, current for the block: a child
    of the span that published it. An untrusted event's traceparent is not followed (anyone can
    write one): its span starts a trace of its own, linked to the one it claims.

    With tracing off nothing records, so there is no span to start: the parent is made current, as
    the no-op tracer would, so that what the function emits continues the trace."""
    spans = tracer(fleet)
    if spans is _NOOP:
        traceparent = event.get("traceparent") if trusted else None
        return _Current(trace.get_current_span(extract(traceparent)) if traceparent else trace.INVALID_SPAN)
    return _consuming(spans, event, fleet, function, cloud, trusted)


class _Current:
    """`span` current for the block: `trace.use_span` for a span that records nothing (and so has
    no exception to record), at a fraction of its cost."""

    __slots__ = ("span", "_token")

    def __init__(self, span: Span):
        self.span = span

    def __enter__(self) -> Span:
        self._token = otel_context.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(self, *exc: object) -> None:
        otel_context.detach(self._token)


@contextlib.contextmanager
def _consuming(spans: trace.Tracer, event: CloudEvent, fleet: Fleet | None, function: str, cloud: str,
               trusted: bool) -> Iterator[Span]:
    parent = extract(event.get("traceparent"))
    claimed = trace.get_current_span(parent).get_span_context()
    links: list[Link] = []
    if not trusted:
        links = [Link(claimed, {"skyfuse.link": "claimed parent (unverified)"})] if claimed.is_valid else []
        parent = Context()
    attributes: dict[str, AttributeValue] = {
        **_attributes(fleet, function, cloud, event), "messaging.operation.type": "process",
        "messaging.operation.name": "process", "messaging.consumer.group.name": f"{cloud}.{function}",
        "faas.trigger": "pubsub"}
    with spans.start_as_current_span(
            f"{function} process {_short(event['type'])}", context=parent, kind=SpanKind.CONSUMER,
            attributes=attributes, links=links, record_exception=False, set_status_on_exception=False) as span:
        yield span


def outcome(span: Span, result: str, error: BaseException | str | None = None) -> None:
    """Record what became of a consumed event (`OUTCOMES`); an error marks the span failed."""
    span.set_attribute("skyfuse.outcome", result)
    if isinstance(error, BaseException):
        span.record_exception(error)
        error = f"{type(error).__name__}: {error}"
    if error and result != "deferred":
        span.set_status(Status(StatusCode.ERROR, str(error)[:500]))
    elif error:
        span.set_attribute("skyfuse.reason", str(error)[:500])


@contextlib.contextmanager
def producing(event: CloudEvent, fleet: Fleet | None, function: str, cloud: str | None = None,
              parent: str | None = None) -> Iterator[Span]:
    """The PRODUCER span of publishing `event`, current for the block; sets the event's
    `traceparent` to it, so its consumers' spans are its children. Call before signing.

    Its parent: the current span (the event being handled); but when `parent` (the traceparent of
    the causing event) belongs to another trace than the current span, that one, with a link to the
    current span, so a run keeps its trace id (e.g. a decision published while handling another
    run's event); and with neither, it starts a trace (the CLI, a timer)."""
    current = trace.get_current_span().get_span_context()
    remote = span_context(parent)
    context: Context | None = None
    links: list[Link] = []
    if remote.is_valid and not (current.is_valid and current.trace_id == remote.trace_id):
        context = extract(parent)
        links = [Link(current, {"skyfuse.link": "emitted while handling"})] if current.is_valid else []
    elif not current.is_valid:
        context = Context()  # a root
    spans = tracer(fleet)
    attributes: dict[str, AttributeValue] = {} if spans is _NOOP else {
        **_attributes(fleet, function, cloud, event), "messaging.operation.type": "send",
        "messaging.operation.name": "publish"}
    with spans.start_as_current_span(
            f"{function} publish {_short(event['type'])}", context=context, kind=SpanKind.PRODUCER,
            attributes=attributes, links=links) as span:
        traceparent = current_traceparent()
        if traceparent:  # the no-op tracer with no parent at all has none: the event keeps its own
            event["traceparent"] = traceparent
        yield span


@contextlib.contextmanager
def root(name: str, fleet: Fleet | None = None,
         attributes: Mapping[str, AttributeValue] | None = None) -> Iterator[Span]:
    """A span that starts a trace, current for the block: what the CLI publishes in it (the shard.ready
    events of one run, through `producing`) is one trace."""
    with tracer(fleet).start_as_current_span(name, context=Context(), kind=SpanKind.INTERNAL,
                                             attributes={"faas.name": "cli", **(attributes or {})}) as span:
        yield span


# -- the inference server ---------------------------------------------------------------------------

class FirstPrediction:
    """The span of the first prediction a server answers with a newly swapped-in model, a child of
    the deploy that put it there: the last link of a run's trace.

    `arm(version, traceparent)` when a model is swapped in (the traceparent the deployer wrote into
    the serving pointer); `served(version, started_ns, status)` after each answer: the first answer
    by that version makes the span (from `started_ns`, a `time.time_ns()`, to now), later ones cost
    a dict lookup."""

    def __init__(self, fleet: Fleet | None, cloud: str, function: str = "inference"):
        self.fleet, self.cloud, self.function = fleet, cloud, function
        self._armed: dict[str, str] = {}  # version → traceparent of its deploy; one at a time
        self._lock = threading.Lock()

    def arm(self, version: str, traceparent: str | None) -> None:
        with self._lock:
            self._armed = {version: traceparent} if traceparent and span_context(traceparent).is_valid else {}

    def served(self, version: str | None, started_ns: int | None = None, status: int = 200,
               rows: int | None = None) -> bool:
        """True when this answer was the armed version's first, and its span was made."""
        if not self._armed or version not in self._armed or status >= 400:
            return False
        with self._lock:
            traceparent = self._armed.pop(version, None)
        if traceparent is None:
            return False
        settings = self.fleet.clouds.get(self.cloud) if self.fleet is not None else None
        attributes: dict[str, AttributeValue] = {
            "faas.name": self.function, "faas.trigger": "http", "skyfuse.cloud": self.cloud,
            "skyfuse.model_version": version, "skyfuse.first_prediction": True, "http.response.status_code": status}
        if settings is not None:
            attributes.update({"cloud.provider": settings.provider, "cloud.region": settings.region})
        if rows is not None:
            attributes["skyfuse.rows"] = rows
        span = tracer(self.fleet).start_span(f"{self.function} first prediction {version}",
                                             context=extract(traceparent), kind=SpanKind.SERVER,
                                             attributes=attributes, start_time=started_ns)
        span.end()
        return True
