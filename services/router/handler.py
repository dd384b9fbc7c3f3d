"""The router's core: keeps the fleet's DNS name pointing at the placed clouds, the front door of
the real clouds (the local fleet's is skyfuse.dev.router, an HTTP proxy doing the same).

placement.changed → the weighted records `[dns] record` should hold (skyfuse.dns.records: one
per configured cloud, weight 0-255 from the placement), set in one atomic batch that also removes
records of clouds no longer configured. Only the control cloud's router acts (DNS is one global
name); the others, and every router while `[dns] provider` is none, skip with the reason.

A decision older (by the scheduler's `sequence`) than one already applied is skipped, so a
redelivered or late decision never rolls DNS back. Each decision is recorded in the control store
(`router/dns/<record name>/<sequence>.json`) *before* its records are written, and after writing,
the router looks for a newer recorded decision and writes that one's records if there is one: of
two routers applying decisions at once, whichever writes last also puts the newest one back. A
decision without a sequence (an operator's, published by hand) is applied as it comes and not
recorded; the deployer treats it the same way.
"""
from __future__ import annotations

from typing import Any, cast

import orjson
from cloudevents.http import CloudEvent

from skyfuse.dns import Backend, open_backend, records
from skyfuse.payloads import PlacementChanged
from skyfuse.runtime.function import Rejected, Runtime
from skyfuse.storage import Store

APPLIED = "router/dns"  # /<record name>/<sequence>.json, zero-padded so the keys sort by it
KEEP = 10  # decisions remembered; older ones are never needed again


def handle(event: CloudEvent, runtime: Runtime) -> None:
    data, settings = cast(PlacementChanged, event.get_data()), runtime.fleet.dns
    if settings.provider == "none":
        runtime.received(event, "skipped: no DNS zone configured ([dns] provider is none)")
        return
    if runtime.cloud != runtime.control_cloud:
        runtime.received(event, f"skipped: the control cloud's router ({runtime.control_cloud}) sets {settings.record}")
        return
    sequence = data.get("sequence")
    store, name = runtime.store(), settings.record
    newest = _newest(store, name)
    if sequence is not None and newest and newest["sequence"] > sequence:
        runtime.received(event, f"skipped: superseded by decision {newest['decision_id']} "
                                f"(scheduler sequence {newest['sequence']} > {sequence}); DNS unchanged")
        return
    endpoints = {cloud: c.endpoint for cloud, c in runtime.fleet.clouds.items()}
    try:
        wanted = records.wanted(data["placements"], endpoints, name, settings.ttl)
    except records.DnsError as exc:  # the same placement would fail again: say why, leave DNS as it is
        raise Rejected(f"dns {name}: {exc}") from None
    backend = open_backend(settings)
    if sequence is None:
        _write(backend, name, wanted)
        runtime.received(event, f"dns {name} ← {records.describe(wanted)} (no sequence: an operator's "
                                "decision, applied as it comes)")
        return
    mine = {"sequence": sequence, "decision_id": data["decision_id"], "records": [r.to_dict() for r in wanted]}
    store.create(_key(name, sequence), orjson.dumps(mine))  # False on a redelivery: recorded already
    applied = _converge(backend, store, name, mine)
    _forget_old(store, name)
    note = f"dns {name} ← {records.describe(wanted)}, sequence {sequence}"
    if applied["sequence"] != sequence:
        note += f"; then decision {applied['decision_id']} (sequence {applied['sequence']}), newer, put back"
    runtime.received(event, note)


def _folder(name: str) -> str:
    return f"{APPLIED}/{name.rstrip('.')}"  # no segment ending in a dot: Azure Blob avoids those


def _key(name: str, sequence: int) -> str:
    return f"{_folder(name)}/{sequence:020d}.json"


def _newest(store: Store, name: str) -> dict[str, Any] | None:
    keys = store.list(_folder(name))
    return orjson.loads(store.get(keys[-1])) if keys else None


def _write(backend: Backend, name: str, wanted: list[records.Record]) -> None:
    backend.apply(records.changes(backend.records(name), wanted))


def _converge(backend: Backend, store: Store, name: str, mine: dict[str, Any]) -> dict[str, Any]:
    """Write this decision's records, then the newest recorded decision's as long as a newer one
    was recorded meanwhile; returns the decision DNS was left at."""
    applied = mine
    _write(backend, name, [records.Record(**r) for r in mine["records"]])
    while (newest := _newest(store, name)) and newest["sequence"] > applied["sequence"]:
        applied = newest
        _write(backend, name, [records.Record(**r) for r in newest["records"]])
    return applied


def _forget_old(store: Store, name: str) -> None:
    for key in store.list(_folder(name))[:-KEEP]:
        store.delete(key)
