"""hypothesis over what arrives on the bus: records with arbitrary values and CloudEvent headers,
some nearly right (signed, with the data or a header changed), go through a real function host on
all three clouds' native shapes. Nothing crashes or stalls: every record is handled or
dead-lettered with a reason, and the partition is committed to its end."""
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from skyfuse import contracts, events
from tests.conftest import signed_event
from tests.functions import probe_state
from tests.integration.test_host import PROVIDERS, Running, clean_probe  # noqa: F401

SAMPLE = contracts.sample("shard.ready")
# signed as `skyfuse publish` does
GOOD_HEADERS = events.encode(signed_event("shard.ready", SAMPLE, "cli", event_id="e-1"))[2]

scalars = st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 63 - 1) | st.floats() | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
mutated_data = st.builds(lambda key, value: orjson.dumps({**SAMPLE, key: value}, option=orjson.OPT_NON_STR_KEYS),
                         st.sampled_from(sorted(SAMPLE)), json_values)
values = st.one_of(st.binary(max_size=200), mutated_data, st.just(orjson.dumps(SAMPLE)),
                   st.builds(lambda d: orjson.dumps({"specversion": "1.0", "id": "s", "source": "f",
                                                     "type": "skyfuse.shard.ready", "data": d}), json_values))
headers = st.one_of(
    st.just(GOOD_HEADERS),
    st.lists(st.tuples(st.sampled_from([n for n, _ in GOOD_HEADERS]), st.binary(max_size=40)), max_size=9),
    st.builds(lambda i, value: [(n, value if j == i else v) for j, (n, v) in enumerate(GOOD_HEADERS)],
              st.integers(0, len(GOOD_HEADERS) - 1), st.binary(max_size=90)),
    st.builds(lambda drop: [h for h in GOOD_HEADERS if h[0] != drop], st.sampled_from([n for n, _ in GOOD_HEADERS])))
records = st.lists(st.tuples(st.one_of(st.none(), st.binary(max_size=16)), values, headers), min_size=40, max_size=80)


@pytest.mark.parametrize("provider", PROVIDERS)
@given(batch=records)
@settings(max_examples=3, deadline=None, database=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.generate])  # shrinking a batch of records through a host takes minutes
def test_arbitrary_records_are_handled_or_dead_lettered_and_nothing_stalls(bus_factory, provider, batch):
    bus, fleet, uid = bus_factory()
    topic = f"fuzz-{uid}"
    bus.ensure_topics([topic], 1)
    for key, value, hdrs in batch:
        bus.publish(topic, value, key, hdrs)
    probe_state.reset()
    with Running(bus, fleet, provider, topic, uid, max_attempts=2) as run:
        run.wait(lambda: bus.committed(f"{provider}.probe-{uid}", topic) == {0: len(batch)}, timeout=120)
    finals = {d.record.offset: d for d in run.deliveries if d.result in ("ok", "rejected", "dead-lettered")}
    assert sorted(finals) == list(range(len(batch)))  # every record reached an end, once committed
    # the host dead-letters what it cannot decode; the function what is not signed by an allowed producer
    dead = [d for d in finals.values() if d.result in ("dead-lettered", "rejected")]
    assert all(d.reason for d in dead)
    letters = bus.read(f"probe-{uid}.dlq", 10_000)
    assert all(dict(r.headers)["skyfuse_dlq_reason"] for r in letters)
    if provider == "azure":  # a batch that fails as a whole runs again (README): a refusal may be written twice
        assert len(letters) >= len(dead)
    else:
        assert len(letters) == len(dead)
    rejected = [d for d in dead if d.result == "rejected"]
    assert all(d.reason.startswith("untrusted: ") for d in rejected)
    print(f"{provider}: {len(batch)} records, {len(dead) - len(rejected)} malformed, {len(rejected)} untrusted, "
          f"{len(batch) - len(dead)} handled")


@pytest.fixture
def bus_factory(tmp_path_factory):
    """A fresh embedded bus per hypothesis example (the function-scoped fixtures are shared by them)."""
    import uuid

    from skyfuse import config
    from skyfuse.bus import open_bus
    from tests.conftest import fleet_env

    opened = []

    def make():
        root = tmp_path_factory.mktemp("fuzz-bus")
        fleet = config.load(environ=fleet_env("embedded", root))
        bus = open_bus(fleet)
        opened.append(bus)
        return bus, fleet, uuid.uuid4().hex[:10]

    yield make
    for bus in opened:
        bus.close()
