"""What `skyfuse status` reports of a fleet: its topics, each function's consumer lag per cloud,
dead-letter counts, and per cloud what it serves (from the endpoints given, the newest placement
and the inference servers' own metrics on the bus)."""
from __future__ import annotations

from typing import Any, cast

from skyfuse import contracts, events, httpclient
from skyfuse.bus import Bus
from skyfuse.config import Fleet


def gather(fleet: Fleet, bus: Bus, endpoints: dict[str, str] | None = None) -> dict[str, Any]:
    """The status as one JSON-ready object; `endpoints`: cloud → inference endpoint, when a fleet serves."""
    ours = {t.topic for t in contracts.catalog().values()}
    ours |= {contracts.dlq_topic(f) for f in contracts.event_functions()}
    topics = {name: n for name, n in bus.topics().items() if name in ours}  # a broker may carry other topics too
    ends = bus.end_offsets_of(sorted(topics))
    sizes = {name: {"partitions": topics[name], "records": sum(ends[name].values())} for name in sorted(topics)}
    functions: list[dict[str, Any]] = []
    dead_letters: dict[str, int] = {}
    for function in contracts.event_functions():
        for cloud in fleet.clouds_for(function):
            group = f"{cloud}.{function}"
            lag = {t: bus.lag(group, t, ends[t]) for t in contracts.topics_for(function) if t in topics}
            functions.append({"function": function, "cloud": cloud, "group": group,
                              "lag": sum(lag.values()), "lag_by_topic": lag})
        dlq = contracts.dlq_topic(function)
        dead_letters[function] = sum(ends[dlq].values()) if dlq in topics else 0
    return {"bus": fleet.bus.backend, "topics": sizes, "functions": functions, "dead_letters": dead_letters,
            "clouds": clouds(fleet, bus, topics, endpoints or {})}


def latest(bus: Bus, type_name: str, topics: dict[str, int], per_partition: int = 200) -> list[dict[str, Any]]:
    """Data of the latest events of a type, oldest first (the log's tail, not its whole)."""
    topic = contracts.event_type(type_name).topic
    if topic not in topics:
        return []
    found: list[dict[str, Any]] = []
    for record in bus.tail(topic, per_partition):
        try:  # decode validated the data against its schema: a JSON object
            found.append(cast(dict[str, Any], events.decode(record.key, record.value, record.headers).get_data()))
        except events.MalformedEvent:
            continue
    return found


def clouds(fleet: Fleet, bus: Bus, topics: dict[str, int], endpoints: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per cloud: endpoint, model version served, placement weight, latency and request rate."""
    placements = latest(bus, "placement.changed", topics)
    weights = {p["cloud"]: p["weight"] for p in (placements[-1]["placements"] if placements else [])}
    metrics = {m["cloud"]: m for m in latest(bus, "metrics.sampled", topics) if m["source"] == "inference"}
    found: dict[str, dict[str, Any]] = {}
    for name in fleet.clouds:
        endpoint = endpoints.get(name)
        health = _health(endpoint) if endpoint else None
        m = metrics.get(name, {})
        latency = m.get("latency_ms") or {}
        found[name] = {"endpoint": endpoint, "model_version": (health or {}).get("model_version"),
                       "placement_weight": weights.get(name, 0.0), "p50_ms": latency.get("p50"),
                       "p99_ms": latency.get("p99"), "requests_per_s": m.get("requests_per_s"),
                       "error_rate": m.get("error_rate")}
    return found


def _health(endpoint: str) -> dict[str, Any] | None:
    try:
        health = httpclient.get_json(f"{endpoint}/health", timeout_s=3)
    except httpclient.HttpError:
        return None
    return health if isinstance(health, dict) else None
