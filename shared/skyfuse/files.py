"""Files other processes read at any moment, written whole or not at all.

Each write goes to a synced, dot-named temporary file beside its target (listings skip it), which is
then renamed over the target (`write_atomic`) or linked to it only if the name is free
(`create_if_absent`). A reader sees the old file or the new, never part of one. A write that fails
leaves the old file and no temporary; a crash mid-write may leave a temporary, which nothing reads.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def staged(path: Path, data: bytes, mode: int = 0o600) -> str:
    """A durable temporary copy of `data` beside `path`, with `mode`; nothing is left if writing it fails."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except FileNotFoundError:  # the folder's first file (checking first would cost every write a call)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            if mode != 0o600:  # mkstemp's own
                os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def sync_dir(path: Path) -> None:
    """Make a rename or link in folder `path` survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` (making its folder if need be)."""
    tmp = staged(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    sync_dir(path.parent)


def create_if_absent(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Write `data` at `path` unless something is there already; True if this call wrote it. Of
    processes creating the same path at once, exactly one does, and the others read its file."""
    if path.exists():  # taken already (most calls): no temporary copy
        return False
    tmp = staged(path, data, mode)
    try:
        os.link(tmp, path)  # fails when the name exists, unlike rename
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    sync_dir(path.parent)
    return True
