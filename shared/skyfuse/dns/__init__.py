"""Weighted DNS, the front door of the real clouds: the `router` function keeps
one name's weighted records equal to the newest placement. `records` is the pure mapping; a
backend reads and changes one provider's records (only Route 53 here; Azure Traffic Manager and
Google Cloud DNS are in the deploy templates, infra/README.md "DNS front door")."""
from __future__ import annotations

from typing import Protocol

from skyfuse.config import Dns, as_dict
from skyfuse.dns.records import Change, Record


class Backend(Protocol):
    def records(self, name: str) -> list[Record]:
        """The weighted records (those with a SetIdentifier) `name` holds now."""

    def apply(self, changes: list[Change]) -> None:
        """Make the changes as one atomic batch."""


_backends: dict[tuple[object, ...], Backend] = {}  # one client per settings: a warm function reuses it


def open_backend(settings: Dns) -> Backend:
    key = tuple(as_dict(settings).values())
    if key not in _backends:
        if settings.provider != "route53":
            raise ValueError(f"dns.provider {settings.provider!r} has no backend; expected route53")
        from skyfuse.dns.route53 import Route53  # boto3 only for the function that needs it

        _backends[key] = Route53(settings)
    return _backends[key]
