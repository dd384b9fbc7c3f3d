"""The command line tells user errors from bugs: a SkyfuseError from the library is one line and its
exit code (2 for what the user must change, 1 for a runtime failure); any other exception keeps its
traceback instead of passing for a usage error."""
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from skyfuse import config, errors
from skyfuse.cli import app
from skyfuse.cli.common import USAGE
from skyfuse.ml.data import DataError
from skyfuse.storage import StoreError

runner = CliRunner()


def failing_load(exc: BaseException):
    def load(path=None, environ=None):
        raise exc
    return load


def test_a_bug_inside_a_command_is_not_turned_into_a_usage_error(monkeypatch):
    monkeypatch.setattr(config, "load", failing_load(ZeroDivisionError("a bug in the library")))
    run = runner.invoke(app, ["keys", "list"])
    assert run.exit_code != USAGE
    assert isinstance(run.exception, ZeroDivisionError), run.output  # propagated, traceback and all
    assert "error:" not in run.output


def test_a_value_error_from_a_dependency_is_a_bug_too(monkeypatch):
    monkeypatch.setattr(config, "load", failing_load(ValueError("numpy: operands could not be broadcast")))
    run = runner.invoke(app, ["simulate", "--json"])
    assert run.exit_code != USAGE and isinstance(run.exception, ValueError) and "error:" not in run.output


@pytest.mark.parametrize("exc, code", [(config.ConfigError("delivery.max_atempts: unknown key"), 2),
                                       (DataError("column 'y' is missing"), 2),
                                       (StoreError("bucket skyfuse-aws does not answer"), 1)])
def test_a_skyfuse_error_is_one_line_with_its_exit_code(monkeypatch, exc, code):
    monkeypatch.setattr(config, "load", failing_load(exc))
    run = runner.invoke(app, ["keys", "list"])
    assert run.exit_code == code, run.output
    assert run.output.strip() == f"error: {exc}"
    assert not isinstance(run.exception, errors.SkyfuseError)  # handled: typer's Exit, not the error


def test_every_domain_error_has_the_one_base_and_invalid_input_stays_a_value_error():
    from skyfuse import contracts, events, signing, training
    from skyfuse.dev.hosts import HostError
    from skyfuse.httpclient import HttpError
    from skyfuse.scheduling.simulate import TraceError

    invalid = [config.ConfigError, contracts.ContractError, events.MalformedEvent, DataError, training.PlanError,
               TraceError]
    failures = [StoreError, HostError, HttpError, signing.KeySetupError]
    assert all(issubclass(c, errors.InvalidInput) and issubclass(c, ValueError) for c in invalid)
    assert all(issubclass(c, errors.Failure) and c.exit_code == 1 for c in failures)
    assert issubclass(HostError, RuntimeError) and issubclass(signing.KeySetupError, RuntimeError)


def test_the_installed_command_prints_a_traceback_for_a_bug(tmp_path):
    """As a user runs it: a trace file that is a folder is an OSError the command reports in one
    line, exit 2; the same command with a bug injected prints Python's traceback and exits 1."""
    folder = tmp_path / "trace"
    folder.mkdir()
    run = subprocess.run([sys.executable, "-m", "skyfuse.cli", "simulate", str(folder)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("error:") and "Traceback" not in run.stderr, run.stderr
    bug = ("import sys, skyfuse.scheduling.simulate as sim\n"
           "sim.compare = lambda *a, **k: [][0]\n"
           "from skyfuse.cli import app\n"
           "sys.argv = ['skyfuse', 'simulate']\n"
           "app()\n")
    run = subprocess.run([sys.executable, "-c", bug], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" in run.stderr and "IndexError" in run.stderr, run.stderr
    assert "error:" not in run.stderr


def test_a_sample_decision_never_outranks_the_schedulers_own():
    """`skyfuse selftest` and `publish --sample` send the sample placement.changed through the real
    deployers, which skip decisions older than the newest applied: the sample carries no
    scheduler sequence, so a run after a self-test still deploys (its 42 once held them back)."""
    from skyfuse import config
    from skyfuse.cli.publish import sample_event

    fleet = config.load(environ={"SKYFUSE_SIGNING__ENABLED": "false"})
    data = sample_event(fleet, "placement.changed").get_data()
    assert "sequence" not in data and data["decision_id"]
    assert sample_event(fleet, "fused.ready").get_data()["version"]  # other samples as they are


def test_a_command_that_loaded_tensorflow_exits_like_any_other(tmp_path):
    """Once TensorFlow is loaded the command ends with os._exit (no interpreter teardown): its exit
    code, its output, its threads' work and its exit handlers must come out as a normal exit's."""
    script = ("import atexit, sys, threading, time, types\n"
              "sys.modules['tensorflow'] = types.ModuleType('tensorflow')  # stands for the real one: loaded\n"
              "atexit.register(lambda: print('exit handler ran', flush=True))\n"
              "threading.Thread(target=lambda: (time.sleep(0.3), print('thread finished'))).start()\n"
              "from skyfuse.cli import run\n"
              "sys.argv = ['skyfuse', *sys.argv[1:]]\n"
              "print('unflushed output', end='')\n"
              "run()\n")
    ok = subprocess.run([sys.executable, "-c", script, "--version"], cwd=tmp_path, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert all(part in ok.stdout for part in ("unflushed output", "skyfuse 0.", "thread finished"))
    assert ok.stdout.rstrip().endswith("exit handler ran")
    usage = subprocess.run([sys.executable, "-c", script, "simulate", "--no-such-option"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "No such option" in usage.stderr and "exit handler ran" in usage.stdout
