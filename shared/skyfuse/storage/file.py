"""A store in a local folder: the embedded stand-in for a cloud bucket."""
from __future__ import annotations

import os
from pathlib import Path

from skyfuse import files
from skyfuse.storage import keys
from skyfuse.storage.base import NotFound, ObjectInfo, Store, StoreError, sha256_of


class FileStore(Store):
    def __init__(self, uri: str):
        path = uri.removeprefix("file://")
        self.root = Path(path).resolve()  # relative paths are relative to the working directory; made on first write
        self.uri = self.root.as_uri()

    @staticmethod
    def split(uri: str) -> tuple[str, str]:
        """A file URI names a file; its store is the folder holding `runs/` (or the parent folder)."""
        path = uri.removeprefix("file://")
        head, sep, tail = path.partition(f"/{keys.ROOT}")
        if sep:
            return f"file://{head}", f"{keys.ROOT}{tail}"
        parent, name = os.path.split(path)
        return f"file://{parent}", name

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise StoreError(f"key {key!r} leaves the store {self.uri}")
        return path

    def put(self, key: str, data: bytes) -> ObjectInfo:
        path = self._path(key)
        files.write_atomic(path, data, 0o600)
        return ObjectInfo(self.uri_for(key), sha256_of(data), len(data))

    def read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no object {self.uri_for(key)}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def create(self, key: str, data: bytes) -> bool:
        # a crash can never leave an empty or half-written object at `key`
        return files.create_if_absent(self._path(key), data, 0o600)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.exists():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*")
                      if p.is_file() and not p.name.startswith("."))
