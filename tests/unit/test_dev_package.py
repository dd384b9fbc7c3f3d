"""The one-machine tooling stays in `skyfuse.dev`: the library never imports the functions
(`services`) nor finds files by the repository's layout, the deployed entry points never import the
dev package or the command line, and the dev package reaches the functions only through the entry
point table pyproject.toml declares."""
import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from skyfuse import contracts
from skyfuse.dev import entrypoints

REPO = Path(__file__).resolve().parents[2]
LIBRARY = REPO / "shared" / "skyfuse"
PROVIDERS = ("aws", "gcp", "azure")


def declared() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["entry-points"][entrypoints.GROUP]


def test_the_installed_table_is_the_declared_one():
    installed = {name: entry.ref for name, entry in entrypoints.table().items()}
    assert installed == declared(), "the installed metadata is stale: reinstall with `pip install -e .` (make install)"


def test_every_function_has_its_entry_points_and_they_resolve():
    for function in contracts.event_functions():
        for provider in PROVIDERS:
            assert entrypoints.get(function, provider), f"{function}.{provider} missing from pyproject.toml"
    for provider in PROVIDERS:
        assert entrypoints.get("inference", provider)
    gcp = entrypoints.require("trainer", "gcp")
    assert gcp.source().is_file() and gcp.source().name == "gcp.py" and gcp.attr == "trainer"
    assert (gcp.import_root() / "services").is_dir()
    with pytest.raises(ValueError, match="no entry point nobody.aws"):
        entrypoints.require("nobody", "aws")


def test_timers_are_the_cores_on_timer():
    timers = {name.split(".")[0] for name in entrypoints.table() if name.endswith(".timer")}
    assert timers == {"fuser", "monitor"}
    assert all(entrypoints.get(f, "timer").attr == "on_timer" for f in timers)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _uses_parents(path: Path) -> bool:
    """`x.parents[n]`: a path found by climbing to the repository root."""
    return any(isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
               and node.value.attr == "parents" for node in ast.walk(ast.parse(path.read_text())))


def test_the_library_outside_dev_neither_imports_the_functions_nor_knows_the_repository():
    outside = [p for p in LIBRARY.rglob("*.py") if "dev" not in p.relative_to(LIBRARY).parts]
    assert len(outside) > 50
    for path in outside:
        imported = _imports(path)
        assert not any(name == "services" or name.startswith("services.") for name in imported), path
        assert not _uses_parents(path), f"{path} climbs to the repository root"
        if "cli" not in path.relative_to(LIBRARY).parts:  # the command line is the dev package's one user
            assert not any(name.startswith("skyfuse.dev") for name in imported), path


def test_deployed_entry_points_import_neither_the_dev_package_nor_the_command_line():
    script = """
import json, sys
from importlib.metadata import entry_points
for ep in entry_points(group="skyfuse.functions"):
    ep.load()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("typer", "rich")
                        or m.startswith(("skyfuse.dev", "skyfuse.cli")))))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []
