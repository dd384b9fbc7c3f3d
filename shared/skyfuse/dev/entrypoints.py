"""The functions' entry points, as the project declares them once: the `skyfuse.functions` entry
point group of its distribution (`[project.entry-points."skyfuse.functions"]` in pyproject.toml).

| name | value | what the local fleet does with it |
| --- | --- | --- |
| `<function>.aws` | `module:lambda_handler` | calls it with a self-managed Kafka event (`LambdaInvoker`) |
| `<function>.gcp` | `module:target` | functions-framework loads the module's file, target `target` |
| `<function>.azure` | `module:app` | the `FunctionApp` whose Kafka triggers get the records |
| `<function>.timer` | `module:on_timer` | called every `training.timer_s` (`TimerHost`) |
| `inference.aws`, `.gcp`, `.azure` | the HTTP app of each cloud | served on 127.0.0.1 (`skyfuse.dev.hosts`) |
| `inference.core` | the cloud-neutral core | imported before gunicorn forks its workers |

Modules are found by import (importlib), files by `importlib.util.find_spec`: nothing here knows
where the functions live on disk. The table is read from the installed metadata, so a change in
pyproject.toml shows after `pip install -e .` (the Makefile reinstalls when pyproject.toml changes).
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from skyfuse.config import ConfigError

GROUP = "skyfuse.functions"
DISTRIBUTION = "skyfuse"


@dataclass(frozen=True)
class EntryPoint:
    name: str  # "<function>.<role>"
    module: str
    attr: str | None

    @property
    def ref(self) -> str:
        """`module:attr`, as `load_handler` and uvicorn take it."""
        return f"{self.module}:{self.attr}" if self.attr else self.module

    @property
    def target(self) -> str:
        """The attribute named after the colon; ConfigError when the entry point names a module only."""
        if not self.attr:
            raise ConfigError(f"entry point {self.name} = {self.ref}: names no attribute (`module:attr`)")
        return self.attr

    def load(self) -> Any:
        """What the entry point names: the module's attribute (a handler, an app), or the module."""
        module = importlib.import_module(self.module)
        return getattr(module, self.attr) if self.attr else module

    def source(self) -> Path:
        """The file of the module (functions-framework takes a source file, not a module)."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.origin:
            raise ConfigError(f"entry point {self.name} = {self.ref}: no module {self.module!r} on the path")
        return Path(spec.origin)

    def import_root(self) -> Path:
        """The folder the module's top-level package is imported from (for a child's PYTHONPATH)."""
        top = self.module.split(".")[0]
        spec = importlib.util.find_spec(top)
        if spec is None or not spec.origin:
            raise ConfigError(f"entry point {self.name} = {self.ref}: no package {top!r} on the path")
        origin = Path(spec.origin)
        return origin.parent.parent if spec.submodule_search_locations else origin.parent


@cache
def table() -> dict[str, EntryPoint]:
    """name → entry point, from the installed distribution's metadata."""
    found = {}
    for ep in entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        if dist is not None and dist.name != DISTRIBUTION:
            continue  # only the project declares its functions
        module, _, attr = ep.value.partition(":")
        found[ep.name] = EntryPoint(ep.name, module.strip(), attr.strip() or None)
    if not found:
        raise ConfigError(f"no {GROUP!r} entry points: skyfuse's metadata is missing or stale; "
                          "reinstall it (`pip install -e .`, or `make install`)")
    return found


def get(function: str, role: str) -> EntryPoint | None:
    """The entry point `<function>.<role>` (role: aws, gcp, azure, timer, core), or None."""
    return table().get(f"{function}.{role}")


def require(function: str, role: str) -> EntryPoint:
    entry = get(function, role)
    if entry is None:
        raise ConfigError(f"no entry point {function}.{role} in the {GROUP!r} table (pyproject.toml); "
                          f"declared: {', '.join(sorted(table()))}")
    return entry
