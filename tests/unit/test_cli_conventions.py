"""The command line keeps the conventions its users know: --version, help that names what to type
(CLOUD, DATA, plain types, never Python type names), exit code 2 for usage errors and 1 for
runtime failures, and shell completion."""
import re

import pytest
import typer
from typer.testing import CliRunner

from skyfuse.cli import app

runner = CliRunner()
COMMANDS = [[], ["publish"], ["events"], ["up"], ["status"], ["dlq"], ["selftest"], ["train"], ["demo"], ["report"],
            ["predict"], ["simulate"], ["keys"], ["keys", "init"], ["keys", "list"], ["keys", "rotate"],
            ["keys", "retire"]]


def test_version():
    from importlib.metadata import version

    run = runner.invoke(app, ["--version"])
    assert run.exit_code == 0 and run.stdout.strip() == f"skyfuse {version('skyfuse')}"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "skyfuse")
def test_help_names_what_to_type_never_python_types(command):
    run = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert run.exit_code == 0, run.output
    assert not re.search(r"<(str|int|float|bool|path)>", run.output), run.output


def test_help_shows_placeholders():
    run = runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "200"})
    assert re.search(r"--cloud\s+CLOUD", run.output) and re.search(r"--data\s+-d\s+DATA", run.output), run.output
    run = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "DATA" in run.output and "PATH" in run.output and re.search(r"--json\s{2,}Print", run.output), run.output


def test_usage_errors_exit_2_runtime_failures_exit_1(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no fleet up here, no runs recorded
    assert runner.invoke(app, ["bogus"]).exit_code == 2
    assert runner.invoke(app, ["predict", "--cloud", "aws"]).exit_code == 2  # --data missing
    assert runner.invoke(app, ["publish", "shard.redy", "--sample"]).exit_code == 2
    assert runner.invoke(app, ["train", "nope.csv", "--target", "y"]).exit_code == 2
    failed = runner.invoke(app, ["predict", "--cloud", "aws", "--data", "{}"])
    assert failed.exit_code == 1 and "no fleet is up" in failed.output
    assert runner.invoke(app, ["report"]).exit_code == 1


def test_shell_completion_is_available():
    command = typer.main.get_command(app)
    assert {"--install-completion", "--show-completion"} <= {o for p in command.params for o in p.opts}
