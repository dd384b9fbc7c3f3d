"""URIs that arrive in events may name only objects inside the fleet's own stores.

An event is data from the bus, so a URI in it is untrusted: `file:///etc/hostname`, another
bucket, or `runs/../../x` must never be read. `locate` accepts a URI only when it lies under the
root of a configured cloud's store (its bucket, container or folder) and every segment of the key
is a plain name (no empty, `.` or `..` segment, no percent-escapes or unusual characters).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from skyfuse.storage.base import StoreError

SEGMENT = re.compile(r"^[A-Za-z0-9_=+@,.-]+$")


class OutsideFleet(StoreError):
    """A URI that names something outside the fleet's stores."""


def store_root(store_uri: str) -> str:
    """The canonical URI of a store: an absolute file URI for a folder (resolved, never created)."""
    if store_uri.startswith("file://"):
        return Path(store_uri.removeprefix("file://")).resolve().as_uri()
    return store_uri.rstrip("/")


def locate(uri: str, roots: Mapping[str, str]) -> tuple[str, str, str]:
    """(cloud, store root, key) of `uri`, or `OutsideFleet` saying why not."""
    if not isinstance(uri, str):
        raise OutsideFleet(f"expected a URI string, got {type(uri).__name__}")
    for cloud, root in roots.items():
        if uri.startswith(root + "/"):
            key = uri[len(root) + 1:]
            for segment in key.split("/"):
                if segment in ("", ".", "..") or not SEGMENT.match(segment):
                    raise OutsideFleet(f"{uri}: key segment {segment!r} is not allowed in a fleet store "
                                       "(no empty, '.' or '..' segments, no escapes or unusual characters)")
            return cloud, root, key
    raise OutsideFleet(f"{uri} is outside the fleet's stores ({', '.join(roots.values())}); "
                       "an event may only name objects in them")
