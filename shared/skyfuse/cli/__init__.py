"""The `skyfuse` command line (typer): one module per command or group of commands, each parsing
its options and handing the work to the library; `common` holds what they share (the app, the
consoles, exit codes, the fleet config and bus), `tables` the tables they print.

    skyfuse = "skyfuse.cli:run"     (pyproject.toml [project.scripts]; also `python -m skyfuse.cli`)
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import Annotated

import typer

from skyfuse.cli.common import app, options
from skyfuse.runtime.function import JsonFormatter


def _version(shown: bool) -> None:
    if shown:
        from importlib.metadata import version

        print(f"skyfuse {version('skyfuse')}")
        raise typer.Exit()


@app.callback()
def main(config: Annotated[str | None, typer.Option("--config", "-c", metavar="FILE", help="Fleet config TOML "
                                                    "(default: $SKYFUSE_CONFIG or ./skyfuse.toml).")] = None,
         verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                               help="JSON logs of every delivery on stderr.")] = False,
         version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                               callback=_version)] = False) -> None:
    options.config_path = config
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, handlers=[handler], force=True)
    logging.getLogger("kafka").setLevel(logging.ERROR)  # kafka-python is chatty about reconnects


# Each module registers its commands on `app`, in the order `skyfuse --help` lists them.
from skyfuse.cli import keys, predict, publish, report, selftest, simulate, status, train, up  # noqa: E402,F401


def run() -> None:
    """The `skyfuse` command. One that loaded TensorFlow (train, demo, up) ends without the
    interpreter's teardown, where TensorFlow alone spends about a second freeing what the process's
    exit frees anyway; everything else an exit does comes first: other threads finish, the exit
    handlers run (logs, traces), the output is flushed."""
    try:
        app()
    except SystemExit as done:
        code = done.code if done.code is not None else 0
        if "tensorflow" not in sys.modules or not isinstance(code, int):
            raise
    else:  # typer always exits through SystemExit; this is for an app called without it
        code = 0
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


__all__ = ["app", "run"]
