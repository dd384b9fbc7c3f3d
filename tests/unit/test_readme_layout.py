"""README's layout table names every module of the library, the CLI and the dev package, and
nothing that is not there."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIBRARY = REPO / "shared" / "skyfuse"


def _row(folder: str) -> str:
    (row,) = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith(f"| `{folder}` |")]
    return row.split("|")[2]


def _named(row: str) -> set[str]:
    return {name.rstrip("/") for name in re.findall(r"`([a-z_]+/?)`", row)}


def _modules(folder: Path) -> set[str]:
    return {p.stem if p.is_file() else p.name for p in folder.iterdir()
            if (p.suffix == ".py" and not p.name.startswith("__")) or (p.is_dir() and (p / "__init__.py").exists())}


# words in a row's backticks that are not modules of its folder
NOT_MODULES = {"shared/skyfuse/": {"services", "data", "router"},  # the event's `data`, the `router` function
               "shared/skyfuse/cli/": {"skyfuse", "demo"},  # the command, a subcommand
               "shared/skyfuse/dev/": set()}


@pytest.mark.parametrize("folder", list(NOT_MODULES))
def test_each_row_names_exactly_the_modules_of_its_folder(folder):
    modules = _modules(REPO / folder) - ({"cli", "dev"} if folder == "shared/skyfuse/" else set())
    named = _named(_row(folder)) - NOT_MODULES[folder] - {"cli", "dev"}  # rows of their own
    assert modules - named == set(), "README's layout table misses these modules"
    assert named - modules == set(), "README's layout table names modules that are not there"
