"""CloudEvents on Kafka: validation on publish, binary mode out, binary and structured mode in."""
import orjson
import pytest

from skyfuse import contracts, events


def sample_event(name="shard.ready", **changes):
    return events.new_event(name, {**contracts.sample(name), **changes}, source="skyfuse://test")


def test_new_event_refuses_invalid_data_naming_field_and_rule():
    with pytest.raises(contracts.ContractError) as caught:
        sample_event(rows=0)
    assert any(line.startswith("rows:") and "minimum" in line for line in caught.value.errors)


def test_unknown_event_type_lists_the_known_ones():
    with pytest.raises(contracts.ContractError, match="expected one of: .*shard.ready"):
        events.new_event("shard.redy", {}, source="x")


def test_binary_mode_round_trip_keeps_attributes_data_and_key():
    event = sample_event()
    key, value, headers = events.encode(event)
    names = dict(headers)
    assert key == b"r1"  # the catalog's key field for shard.ready is run_id
    assert names["ce_type"] == b"skyfuse.shard.ready" and names["ce_specversion"] == b"1.0"
    assert names["content-type"] == b"application/json"
    assert orjson.loads(value) == contracts.sample("shard.ready")
    back = events.decode(key, value, headers)
    assert back["id"] == event["id"] and back.get_data() == event.get_data()
    assert back["traceparent"] == event["traceparent"]


def test_structured_mode_is_accepted_on_input():
    event = sample_event()
    doc = {"specversion": "1.0", "id": "abc", "source": "x", "type": "skyfuse.shard.ready",
           "datacontenttype": "application/json", "data": event.get_data()}
    back = events.decode(None, orjson.dumps(doc), [("content-type", b"application/cloudevents+json")])
    assert back["id"] == "abc" and back.get_data() == event.get_data()


@pytest.mark.parametrize("value, headers, reason", [
    (b"hello", [], "not a CloudEvent"),
    (b"{not json", [("ce_specversion", b"1.0"), ("ce_id", b"1"), ("ce_source", b"x"),
                    ("ce_type", b"skyfuse.shard.ready")], "not"),
    (b"{}", [("ce_specversion", b"1.0"), ("ce_id", b"1"), ("ce_source", b"x"), ("ce_type", b"skyfuse.nope")],
     "unknown event type"),
    (b'{"run_id": "r1"}', [("ce_specversion", b"1.0"), ("ce_id", b"1"), ("ce_source", b"x"),
                           ("ce_type", b"skyfuse.shard.ready")], "'shard_id' is a required property"),
    (b"{}", [("ce_specversion", b"0.3"), ("ce_id", b"1"), ("ce_source", b"x"),
             ("ce_type", b"skyfuse.shard.ready")], "specversion"),
])
def test_malformed_records_are_refused_with_a_reason(value, headers, reason):
    with pytest.raises(events.MalformedEvent, match=reason):
        events.decode(None, value, headers)


def test_caused_by_carries_the_trace_on():
    first = sample_event()
    second = events.new_event("model.ready", contracts.sample("model.ready"), source="x", caused_by=first)
    assert events.EventInfo.of(second).trace_id == events.EventInfo.of(first).trace_id


BREAKS_SCHEMA = (b"r1", b'{"run_id": "r1"}', [("ce_specversion", b"1.0"), ("ce_id", b"1"), ("ce_source", b"x"),
                                              ("ce_type", b"skyfuse.shard.ready")])


def test_checked_records_are_read_again_without_their_checks_only_those_bytes_only_in_the_block():
    # a record that breaks its schema stands in for one the host checked: only its exact bytes skip the checks
    key, value, headers = BREAKS_SCHEMA
    with events.checked([BREAKS_SCHEMA]):
        assert events.decode(key, value, list(headers)).get_data() == {"run_id": "r1"}
        with pytest.raises(events.MalformedEvent, match="'shard_id' is a required property"):
            events.decode(b"r2", value, headers)  # another key
        with pytest.raises(events.MalformedEvent, match="'shard_id' is a required property"):
            events.decode(key, value, [*headers[:-1], ("ce_type", b"skyfuse.shard.ready"), ("x", b"")])
        with pytest.raises(events.MalformedEvent, match="missing required attribute"):
            events.decode(key, value, [h for h in headers if h[0] != "ce_id"])
    with pytest.raises(events.MalformedEvent, match="'shard_id' is a required property"):
        events.decode(key, value, headers)


def test_a_checked_record_reads_as_the_full_decode_reads_it():
    key, value, headers = events.encode(sample_event())
    full = events.decode(key, value, headers)
    with events.checked([(key, value, headers)]):
        again = events.decode(key, value, [(name, bytes(v)) for name, v in headers])
    assert again.get_attributes() == full.get_attributes() and again.get_data() == full.get_data()
    assert again.get_attributes()["partitionkey"] == key and again.get_data() is not full.get_data()
