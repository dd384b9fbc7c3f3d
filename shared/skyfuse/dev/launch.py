"""Run a server module as `python -m` does, after importing what it will import with Python's
garbage collector off: a faster cold start for the local hosts (`skyfuse.dev.hosts`).

    python -m skyfuse.dev.launch MODULE ... -- uvicorn MODULE:APP --port 8081

A server's start makes tens of thousands of objects (modules, classes, schemas) that live as long
as the process, and almost no garbage: the collector's passes over them while they are imported
cost about a tenth of a host's cold start. So the server module and the modules named before
`--` are imported with the collector off; what they made is then frozen (`gc.freeze`: left out of
every later collection, and left untouched in the workers a pre-fork server such as gunicorn
forks), the collector is turned back on, and the server module runs as `__main__`.

Started with `SKYFUSE_LIFELINE_FD` (as `skyfuse.dev.hosts` starts it), the server stops when the
process that started it dies, even by SIGKILL: a killed `skyfuse up` leaves no server holding its port.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import os
import runpy
import signal
import sys
import threading

LIFELINE = "SKYFUSE_LIFELINE_FD"  # the read end of a pipe whose write end only the starting process holds
GRACE_S = 5.0  # as `Host.stop`: SIGTERM to the server's process group, SIGKILL after this


def follow_lifeline() -> None:
    """Stop the server's process group once the lifeline reads end-of-file: its writer has died,
    and with it every copy of the write end."""
    fd = os.environ.pop(LIFELINE, None)
    if fd is None:
        return

    def stop(sig: int) -> None:
        if os.getpgid(0) == os.getpid():  # the leader of its own group (start_new_session): the workers too
            os.killpg(0, sig)
        else:
            os.kill(os.getpid(), sig)

    def wait() -> None:
        while os.read(int(fd), 1):  # nothing is ever written
            pass
        stop(signal.SIGTERM)
        threading.Event().wait(GRACE_S)  # a server that has stopped by then takes this thread with it
        stop(signal.SIGKILL)

    threading.Thread(target=wait, name="skyfuse-lifeline", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        raise SystemExit("usage: python -m skyfuse.dev.launch [MODULE ...] -- SERVER_MODULE [ARG ...]")
    split = argv.index("--")
    preload, (server, *args) = argv[:split], argv[split + 1:]
    follow_lifeline()
    gc.disable()
    try:
        for name in (server, *preload):
            with contextlib.suppress(Exception):  # the server imports it again and reports the error its own way
                importlib.import_module(name)
    finally:
        gc.freeze()
        gc.enable()
    sys.argv = [server, *args]
    runpy.run_module(server, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
