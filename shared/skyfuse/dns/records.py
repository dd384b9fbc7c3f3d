"""From a placement to the weighted record set a DNS name should hold: pure, no SDK.

One weighted record per configured cloud that has an endpoint: SetIdentifier = the cloud's name,
target = the host of its endpoint URL (A for an IPv4 address, AAAA for IPv6, CNAME for a host
name), weight = its placement weight as Route 53's integer 0-255. The heaviest cloud gets 255 and
the others their share of it, so the ratios are kept; a placed cloud never rounds down to 0 (Route
53 would send it nothing) and an unplaced one is exactly 0.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from skyfuse.errors import InvalidInput

MAX_WEIGHT = 255  # Route 53's largest weight


class DnsError(InvalidInput):
    """A record set that cannot be made from this config; the message names the key to change."""


@dataclass(frozen=True)
class Record:
    name: str
    type: str  # A, AAAA or CNAME
    set_id: str  # the cloud
    weight: int
    value: str
    ttl: int

    @property
    def key(self) -> tuple[str, str]:
        return self.type, self.set_id

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Change:
    action: str  # UPSERT or DELETE
    record: Record


def weights(placements: Sequence[Mapping[str, Any]], clouds: list[str]) -> dict[str, int]:
    """cloud → integer weight 0..255 for every cloud in `clouds`, from the placement's fractions."""
    share = {p["cloud"]: float(p["weight"]) for p in placements}
    top = max((share.get(c, 0.0) for c in clouds), default=0.0)
    if top <= 0:
        placed = ", ".join(sorted(c for c, w in share.items() if w > 0)) or "none"
        raise DnsError(f"no configured cloud ({', '.join(clouds)}) has weight in this placement (placed: {placed}): "
                       "DNS is left as it is")
    return {c: max(1, round(MAX_WEIGHT * share[c] / top)) if share.get(c, 0.0) > 0 else 0 for c in clouds}


def target(endpoint: str) -> tuple[str, str]:
    """(record type, value) for a cloud's inference endpoint URL: its host, without port or path."""
    host = urlsplit(endpoint).hostname if "//" in endpoint else None
    if not host:
        raise DnsError(f"endpoint {endpoint!r} has no host: give its base URL, e.g. https://api.example.com")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "CNAME", host.lower()
    return ("A" if address.version == 4 else "AAAA"), str(address)


def wanted(placements: Sequence[Mapping[str, Any]], endpoints: dict[str, str], name: str, ttl: int) -> list[Record]:
    """The records `name` should hold for this placement; `endpoints`: configured cloud → endpoint
    URL ('' when it has none)."""
    with_endpoint = [c for c, url in endpoints.items() if url]
    placed = [p["cloud"] for p in placements if p["weight"] > 0 and p["cloud"] in endpoints]
    missing = [c for c in placed if not endpoints[c]]
    if missing:  # (a cloud name with '-' has no environment variable form)
        keys = [f"clouds.{c}.endpoint" + ("" if "-" in c else f" (SKYFUSE_CLOUDS__{c.upper()}__ENDPOINT)")
                for c in missing]
        raise DnsError(f"placed, but no endpoint to point DNS at: {', '.join(keys)} empty; set "
                       f"{'it' if len(keys) == 1 else 'each'} to the cloud's inference base URL")
    by_cloud = weights(placements, with_endpoint)
    records = []
    for cloud in with_endpoint:
        kind, value = target(endpoints[cloud])
        records.append(Record(name=name, type=kind, set_id=cloud, weight=by_cloud[cloud], value=value, ttl=ttl))
    kinds = {r.type for r in records}
    if "CNAME" in kinds and len(kinds) > 1:  # a name holding a CNAME may hold nothing else
        hosts = [f"clouds.{r.set_id}.endpoint" for r in records if r.type == "CNAME"]
        ips = [f"clouds.{r.set_id}.endpoint" for r in records if r.type != "CNAME"]
        raise DnsError(f"{', '.join(hosts)} name a host but {', '.join(ips)} an IP address: one DNS name cannot hold "
                       "CNAME and address records together; give every cloud a host name endpoint (or every one an IP)")
    return records


def changes(current: list[Record], wanted_records: list[Record]) -> list[Change]:
    """One atomic batch that leaves `name` with exactly `wanted_records` among its weighted records:
    deletes first (a cloud no longer configured, or whose record changed type), then upserts."""
    keep = {r.key for r in wanted_records}
    stale = [Change("DELETE", r) for r in current if r.key not in keep]
    return stale + [Change("UPSERT", r) for r in wanted_records]


def describe(records: list[Record]) -> str:
    """`aws 255, gcp 109, azure 0 (A 127.0.0.1)` for logs and `received` notes."""
    targets = sorted({f"{r.type} {r.value}" for r in records})
    return ", ".join(f"{r.set_id} {r.weight}" for r in records) + f" ({'; '.join(targets)})"
