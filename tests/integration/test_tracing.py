"""OpenTelemetry traces across events: one training run is one trace, from the CLI's shard.ready
through the trainers, exporters and fuser to the scheduler and the deployer, through the real
entry points of every cloud on the embedded bus; each consumer's span is the child of the span
that published the event it consumed. Spans are read from the SDK's in-memory exporter."""
import http.server
import sys
import threading

import numpy as np
import orjson
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracer, SpanKind, StatusCode

from skyfuse import config, contracts, events, tracing, training
from skyfuse.bus import open_bus
from skyfuse.dev.fleet import Fabric, build_hosts, build_timers
from skyfuse.runtime.function import Rejected, Runtime, hosted, run_handler
from skyfuse.storage import keys, open_store
from tests.conftest import fleet_env, signed_event

CLOUDS = ("aws", "gcp", "azure")
FAST = {"SKYFUSE_TRAINING__EPOCHS": 30, "SKYFUSE_TRAINING__HIDDEN": "[16]", "SKYFUSE_TRAINING__TIMER_S": 0.3}
PIPELINE = ["trainer", "exporter", "fuser", "scheduler", "deployer"]


def env_for(tmp_path, **extra):
    stores = {f"SKYFUSE_CLOUDS__{c.upper()}__STORE": f"file://{tmp_path}/stores/{c}" for c in CLOUDS}
    return {**fleet_env("embedded", tmp_path), **stores, **{k: str(v) for k, v in {**FAST, **extra}.items()}}


@pytest.fixture
def fleet(tmp_path):
    return config.load(environ=env_for(tmp_path))


@pytest.fixture
def spans():
    """Every span of this test, in memory (the provider is skyfuse's own: no global to clash)."""
    exporter = InMemorySpanExporter()
    provider = tracing.sdk_provider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with tracing.installed(provider):
        yield exporter
    provider.shutdown()


@pytest.fixture
def no_otel_env(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)


def attr(span, name):
    return (span.attributes or {}).get(name)


def ancestry(span, by_id) -> list:
    """`span`, its parent, its parent's parent, … up to the root; fails on a missing parent."""
    chain = [span]
    while chain[-1].parent is not None:
        parent = by_id.get(chain[-1].parent.span_id)
        assert parent is not None, f"{chain[-1].name}: its parent span {chain[-1].parent.span_id:x} was never recorded"
        chain.append(parent)
    return chain


def functions_of(chain) -> list[str]:
    """The functions a chain passes, each once per stay (consumer and producer spans of one step)."""
    names: list[str] = []
    for span in chain:
        if not names or names[-1] != attr(span, "faas.name"):
            names.append(attr(span, "faas.name"))
    return names


def bus_events(bus, type_name):
    topic = contracts.event_type(type_name).topic
    return [events.decode(r.key, r.value, r.headers) for r in bus.read(topic, 10_000)]


def span_id_of(traceparent: str) -> int:
    return int(traceparent.split("-")[2], 16)


def trace_id_of(traceparent: str) -> int:
    return int(traceparent.split("-")[1], 16)


def test_one_training_run_is_one_trace_from_shard_ready_to_the_served_model(fleet, spans):
    from services.scheduler.handler import _schedulers
    from skyfuse.ml import data as mldata

    _schedulers.clear()  # a fresh scheduler process
    bus = open_bus(fleet)
    plan = training.Plan(target="diagnosis", clouds=list(CLOUDS), fusion="vote", rounds=1)
    prepared = training.prepare(fleet, mldata.sample_dataset("breast_cancer"), plan)
    # follow publishes the run's shard.ready events as the CLI does: one root, one PRODUCER span each
    with Fabric(build_hosts(fleet, bus, functions=PIPELINE), build_timers(fleet, bus, functions=PIPELINE)):
        progress = training.follow(bus, prepared, lambda p: None, timeout_s=120, until_served=True)
    # the fabric has stopped: every invocation that started has ended, and so has its span
    assert progress.fused is not None and progress.deployed, progress.failures
    version, (home,) = progress.fused["version"], progress.placed
    assert progress.deployments[home]["state"] == "serving"
    finished = spans.get_finished_spans()
    by_id = {s.context.span_id: s for s in finished}
    assert len(by_id) == len(finished), "span ids repeat (ids drawn from the `random` module the trainers seed?)"

    # one run, one trace, one root: the CLI's
    assert {s.context.trace_id for s in finished} == {trace_id_of(prepared.shard_events[0]["traceparent"])}
    (root,) = [s for s in finished if s.parent is None]
    assert root.name == f"cli train {plan.run_id}"

    # each consumer span is the child of the span that published the very event it consumed
    producers: dict[str, set[int]] = {}
    for s in finished:
        if s.kind == SpanKind.PRODUCER:
            producers.setdefault(attr(s, "messaging.message.id"), set()).add(s.context.span_id)
    consumers = [s for s in finished if s.kind == SpanKind.CONSUMER]
    assert consumers
    for s in consumers:
        assert s.parent.is_remote and s.parent.span_id in producers[attr(s, "messaging.message.id")], s.name
        assert attr(s, "skyfuse.outcome") in ("handled", "deferred"), (s.name, attr(s, "skyfuse.outcome"))
        assert s.name == f"{attr(s, 'faas.name')} process {attr(s, 'cloudevents.event_type').removeprefix('skyfuse.')}"
        assert attr(s, "messaging.system") == "kafka" and attr(s, "messaging.destination.name")
        assert attr(s, "cloud.provider") == fleet.clouds[attr(s, "skyfuse.cloud")].provider
    # and each function's PRODUCER span is the child of the consumer span it was emitted in
    for s in finished:
        if s.kind == SpanKind.PRODUCER and attr(s, "faas.name") != "cli":
            parent = by_id[s.parent.span_id]
            assert parent.kind == SpanKind.CONSUMER and not s.parent.is_remote, s.name
            assert (attr(parent, "faas.name"), attr(parent, "skyfuse.cloud")) == \
                (attr(s, "faas.name"), attr(s, "skyfuse.cloud"))
    # the events on the bus name their producer span
    for type_name in ("model.ready", "onnx.ready", "fused.ready", "placement.changed", "deployment.status"):
        for event in bus_events(bus, type_name):
            assert span_id_of(event["traceparent"]) in producers[event["id"]], type_name

    # trainer and exporter in all three clouds, each chain reaching the fuser in the control cloud
    control = fleet.control_cloud or next(iter(fleet.clouds))
    for cloud in CLOUDS:
        members = [s for s in consumers if attr(s, "faas.name") == "fuser" and attr(s, "skyfuse.cloud") == control
                   and attr(s, "cloudevents.event_type") == "skyfuse.onnx.ready"
                   and attr(s, "cloudevents.event_subject") == cloud]
        assert members, f"the fuser never consumed {cloud}'s onnx.ready"
        for member in members:
            chain = ancestry(member, by_id)
            assert functions_of(chain) == ["fuser", "exporter", "trainer", "cli"]
            assert {attr(s, "skyfuse.cloud") for s in chain if attr(s, "faas.name") in ("exporter", "trainer")} == \
                {cloud}
            assert chain[-1] is root

    # and one unbroken chain from the model being served back to the shard: six functions
    serving = next(e for e in bus_events(bus, "deployment.status")
                   if e.get_data()["state"] == "serving" and e.get_data()["model_version"] == version)
    status_span = by_id[span_id_of(serving["traceparent"])]
    chain = ancestry(status_span, by_id)
    assert functions_of(chain) == ["deployer", "scheduler", "fuser", "exporter", "trainer", "cli"]
    clouds_on_chain = [attr(s, "skyfuse.cloud") for s in chain if attr(s, "faas.name") != "cli"]
    assert clouds_on_chain[0] == home and control in clouds_on_chain
    on_tree = {(attr(s, "faas.name"), attr(s, "skyfuse.cloud")) for s in finished if s.kind == SpanKind.CONSUMER}
    assert {c for f, c in on_tree if f == "trainer"} == set(CLOUDS) and len({f for f, _ in on_tree}) >= 5

    # the first prediction the new model serves closes the trace (what the inference server is to do)
    first = tracing.FirstPrediction(fleet, home)
    first.arm(version, serving["traceparent"])
    assert first.served(version, status=200) and not first.served(version, status=200)
    (prediction,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert prediction.parent.span_id == status_span.context.span_id
    assert functions_of(ancestry(prediction, {**by_id, prediction.context.span_id: prediction}))[:2] == \
        ["inference", "deployer"]


def test_outcomes_of_a_consumed_event_are_on_its_span(fleet, spans):
    from skyfuse.runtime.idempotency import InProgress

    bus = open_bus(fleet)
    runtime = Runtime("aws", "trainer", fleet, bus_factory=lambda: bus)
    shard = {**contracts.sample("shard.ready"), "cloud": "aws"}
    with tracing.root("cli publish", fleet):
        good = signed_event("shard.ready", shard, "cli", fleet)
        with tracing.producing(good, fleet, "cli"):
            pass

    def raising(error):
        def handle(event, rt):
            raise error
        return handle

    outcomes = {}
    for name, handle in [("rejected", raising(Rejected("one class only"))),
                         ("deferred", raising(InProgress("held elsewhere", retry_after_s=0.5))),
                         ("failed", raising(RuntimeError("store timed out")))]:
        spans.clear()
        with hosted(runtime):
            if name == "rejected":
                run_handler(handle, good, runtime)
            else:
                with pytest.raises((InProgress, RuntimeError)):
                    run_handler(handle, good, runtime)
        (span,) = spans.get_finished_spans()
        outcomes[name] = span
        assert span.parent.span_id == span_id_of(good["traceparent"]) and attr(span, "skyfuse.outcome") == name
    assert outcomes["rejected"].status.status_code == StatusCode.ERROR
    assert "one class only" in outcomes["rejected"].status.description
    assert outcomes["deferred"].status.status_code == StatusCode.UNSET  # a retry later is no error
    assert outcomes["failed"].status.status_code == StatusCode.ERROR
    assert [e.name for e in outcomes["failed"].events] == ["exception"]

    # an event nobody signed: its claimed traceparent is not followed, only linked
    spans.clear()
    forged = events.new_event("shard.ready", shard, source="skyfuse://cli", caused_by=good)
    with hosted(runtime):
        run_handler(raising(AssertionError("never called")), forged, runtime)
    (span,) = spans.get_finished_spans()
    assert attr(span, "skyfuse.outcome") == "untrusted" and span.status.status_code == StatusCode.ERROR
    assert span.parent is None and span.context.trace_id != trace_id_of(good["traceparent"])
    assert [link.context.span_id for link in span.links] == [span_id_of(good["traceparent"])]
    assert len(bus.read("trainer.dlq")) == 2  # the rejected one and the untrusted one


def test_an_event_of_another_run_emitted_while_handling_keeps_its_own_trace(fleet, spans):
    """The scheduler publishes an earlier decision from its outbox while it handles another run's
    event: the decision stays in its run's trace, linked to what was being handled."""
    bus = open_bus(fleet)
    runtime = Runtime("aws", "scheduler", fleet, bus_factory=lambda: bus)
    with tracing.root("earlier run", fleet):
        earlier = tracing.current_traceparent()
    sample = signed_event("metrics.sampled", {**contracts.sample("metrics.sampled"), "cloud": "aws"}, "aws/inference",
                          fleet)

    def handle(event, rt):
        rt.emit("placement.changed", contracts.sample("placement.changed"), traceparent=earlier)
        rt.emit("placement.changed", contracts.sample("placement.changed"), caused_by=event)

    with hosted(runtime):
        run_handler(handle, sample, runtime)
    other, same = runtime.emitted[-2:]
    by_name = {}
    for s in spans.get_finished_spans():
        by_name.setdefault(s.kind, []).append(s)
    (consumer,) = by_name[SpanKind.CONSUMER]
    outboxed, caused = by_name[SpanKind.PRODUCER]
    assert trace_id_of(other["traceparent"]) == trace_id_of(earlier)  # the earlier run's trace
    assert outboxed.parent.span_id == span_id_of(earlier) and outboxed.context.trace_id == trace_id_of(earlier)
    assert [link.context.span_id for link in outboxed.links] == [consumer.context.span_id]
    assert caused.parent.span_id == consumer.context.span_id and not caused.links
    assert span_id_of(same["traceparent"]) == caused.context.span_id


def test_a_round_fused_on_the_quorum_timer_stays_in_the_run_trace(fleet, spans):
    """No event is being handled when the timer fuses: fused.ready goes on from a member's trace."""
    from services.fuser.handler import handle, on_timer
    from skyfuse.ml import data as mldata
    from skyfuse.serving.testing import IRIS_CLASSES, IRIS_FEATURES, classifier

    bus = open_bus(fleet)
    runtime = Runtime("aws", "fuser", fleet, bus_factory=lambda: bus)
    control = runtime.store()
    rng = np.random.default_rng(0)
    rows = mldata.Dataset(rng.normal(size=(12, 4)), np.arange(12) % 3, list(IRIS_FEATURES), list(IRIS_CLASSES),
                          "species")
    control.put(keys.run_info("rq"), orjson.dumps({"target": "species", "classes": list(IRIS_CLASSES),
                                                  "features": list(IRIS_FEATURES), "task": "multiclass"}))
    control.put(keys.validation("rq"), mldata.to_csv_bytes(rows))
    manifest = {"expected_members": 3, "clouds": list(CLOUDS), "quorum": 2, "timeout_s": 0.01, "fusion": "vote",
                "rounds": 1}
    with tracing.root("cli train rq", fleet):
        members = []
        for i, cloud in enumerate(("aws", "gcp")):  # azure's member never comes
            saved = open_store(fleet.clouds[cloud].store).put(keys.member_onnx("rq", 0, cloud, str(i)),
                                                              classifier(seed=i))
            data = {**contracts.sample("onnx.ready"), "run_id": "rq", "cloud": cloud, "shard_id": str(i),
                    "onnx_uri": saved.uri, "sha256": saved.sha256, "manifest": manifest}
            event = signed_event("onnx.ready", data, f"{cloud}/exporter", fleet)
            with tracing.producing(event, fleet, "exporter", cloud):
                members.append(event)
    with hosted(runtime):
        for event in members:
            run_handler(handle, event, runtime)
        assert not runtime.emitted  # two of three: the round waits
        control.put(keys.round_opened("rq", 0), orjson.dumps({"at": 0, "manifest": manifest}))  # timed out
        on_timer(runtime)  # as the TimerHost calls it: no span is current
    (fused,) = runtime.emitted
    assert fused["type"] == "skyfuse.fused.ready"
    (publish,) = [s for s in spans.get_finished_spans() if attr(s, "messaging.message.id") == fused["id"]]
    assert publish.kind == SpanKind.PRODUCER
    assert publish.parent.span_id in {span_id_of(e["traceparent"]) for e in members}
    assert publish.context.trace_id == trace_id_of(members[0]["traceparent"])
    assert span_id_of(fused["traceparent"]) == publish.context.span_id


def test_tracing_is_off_by_default_and_events_pass_their_trace_on_as_before(fleet, no_otel_env):
    assert tracing.endpoint(fleet) is None and isinstance(tracing.tracer(fleet), NoOpTracer)
    bus = open_bus(fleet)
    runtime = Runtime("aws", "trainer", fleet, bus_factory=lambda: bus)
    shard = signed_event("shard.ready", {**contracts.sample("shard.ready"), "cloud": "aws"}, "cli", fleet)

    def handle(event, rt):
        rt.emit("model.ready", {**contracts.sample("model.ready"), "cloud": "aws"}, caused_by=event)

    with hosted(runtime):
        run_handler(handle, shard, runtime)
    assert runtime.emitted[-1]["traceparent"] == shard["traceparent"]  # exactly as before: the causing trace
    fresh = runtime.emit("model.ready", {**contracts.sample("model.ready"), "cloud": "aws"})
    assert fresh["traceparent"] != shard["traceparent"] and len(fresh["traceparent"].split("-")[1]) == 32


def test_with_tracing_off_a_trusted_parent_is_current_in_the_block_and_an_untrusted_one_is_not(fleet, no_otel_env):
    shard = signed_event("shard.ready", {**contracts.sample("shard.ready"), "cloud": "aws"}, "cli", fleet)
    with tracing.consuming(shard, fleet, "trainer", "aws") as span:
        assert not span.is_recording() and tracing.current_traceparent() == shard["traceparent"]
        with tracing.consuming(shard, fleet, "trainer", "aws", trusted=False) as untrusted:
            assert not untrusted.get_span_context().is_valid and tracing.current_traceparent() is None
        assert tracing.current_traceparent() == shard["traceparent"]
    assert tracing.current_traceparent() is None
    del shard["traceparent"]
    with tracing.consuming(shard, fleet, "trainer", "aws") as span:
        assert not span.get_span_context().is_valid and tracing.current_traceparent() is None


def test_the_endpoint_comes_from_the_config_or_the_standard_variables(tmp_path):
    def fleet_with(**env):
        return config.load(environ=env_for(tmp_path, **env))

    assert tracing.endpoint(fleet_with(SKYFUSE_TRACING__OTLP_ENDPOINT="http://collector:4318/"), environ={}) == \
        "http://collector:4318/v1/traces"
    assert tracing.endpoint(fleet_with(SKYFUSE_TRACING__OTLP_ENDPOINT="https://otel.example/v1/traces"),
                            environ={}) == "https://otel.example/v1/traces"
    plain = fleet_with()
    assert plain.tracing.service_name == "skyfuse"
    assert tracing.endpoint(plain, environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == "env"
    assert tracing.endpoint(plain, environ={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/x"}) == "env"
    assert tracing.endpoint(fleet_with(SKYFUSE_TRACING__OTLP_ENDPOINT="http://c:4318"),
                            environ={"OTEL_SDK_DISABLED": "true"}) is None
    with pytest.raises(config.ConfigError, match="tracing.otlp_endpont"):
        fleet_with(SKYFUSE_TRACING__OTLP_ENDPONT="http://c:4318")


class Collector(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["content-length"]))
        Collector.received.append((self.path, self.headers["content-type"], body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_spans_are_exported_over_otlp_http_when_an_endpoint_is_configured(tmp_path, no_otel_env, monkeypatch):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Collector.received.clear()
    try:
        fleet = config.load(environ=env_for(tmp_path, SKYFUSE_TRACING__OTLP_ENDPOINT=f"http://127.0.0.1:{server.server_port}"))
        bus = open_bus(fleet)
        runtime = Runtime("gcp", "trainer", fleet, bus_factory=lambda: bus)
        shard = signed_event("shard.ready", {**contracts.sample("shard.ready"), "cloud": "gcp"}, "cli", fleet)
        with hosted(runtime):
            run_handler(lambda e, rt: rt.emit("model.ready", {**contracts.sample("model.ready"), "cloud": "gcp"},
                                              caused_by=e), shard, runtime)
        tracing.shutdown()  # flushes the batch
    finally:
        server.shutdown()
        server.server_close()
        tracing.shutdown()
    ((path, content_type, body),) = Collector.received
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    request = ExportTraceServiceRequest.FromString(body)
    (resource_spans,) = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "skyfuse"
    names = sorted(s.name for scope in resource_spans.scope_spans for s in scope.spans)
    assert names == ["trainer process shard.ready", "trainer publish model.ready"]


def test_a_missing_exporter_package_is_named_and_leaves_the_events_flowing(fleet, monkeypatch, caplog, no_otel_env):
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    configured = config.replace(fleet, tracing=config.Tracing(otlp_endpoint="http://127.0.0.1:9"))
    with pytest.raises(tracing.TracingSetupError, match="opentelemetry-exporter-otlp-proto-http"):
        tracing.build_provider(tracing.endpoint(configured))
    try:
        bus = open_bus(fleet)
        runtime = Runtime("aws", "trainer", configured, bus_factory=lambda: bus)
        shard = signed_event("shard.ready", {**contracts.sample("shard.ready"), "cloud": "aws"}, "cli", fleet)
        with hosted(runtime):
            run_handler(lambda e, rt: rt.emit("model.ready", {**contracts.sample("model.ready"), "cloud": "aws"},
                                              caused_by=e), shard, runtime)
            run_handler(lambda e, rt: None, shard, runtime)
        assert runtime.emitted[-1]["traceparent"] == shard["traceparent"]
        errors = [r.getMessage() for r in caplog.records if r.name == "skyfuse.tracing" and r.levelname == "ERROR"]
        assert len(errors) == 1 and "opentelemetry-exporter-otlp-proto-http" in errors[0]
    finally:
        tracing.shutdown()


def test_the_first_prediction_of_a_model_is_traced_once(fleet, spans):
    with tracing.root("deploy", fleet):
        deployed = tracing.current_traceparent()
    first = tracing.FirstPrediction(fleet, "azure")
    assert not first.served("v1")  # nothing armed
    first.arm("v1", deployed)
    assert not first.served("v0") and not first.served("v1", status=503)  # another version; an error
    assert first.served("v1", rows=3) and not first.served("v1")
    first.arm("v2", None)  # a pointer without a trace: nothing to join
    assert not first.served("v2")
    (span,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert span.parent.span_id == span_id_of(deployed) and attr(span, "skyfuse.model_version") == "v1"
    assert attr(span, "cloud.provider") == "azure" and attr(span, "faas.name") == "inference"
