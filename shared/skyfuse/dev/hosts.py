"""Run each cloud's inference entry point behind a real HTTP server on 127.0.0.1, as a subprocess.

| provider | server | app (entry point, `skyfuse.dev.entrypoints`) | routes |
| --- | --- | --- | --- |
| aws | uvicorn (uvloop, httptools) | `inference.aws`: Powertools' `HttpResolverLocal` as ASGI | `/predict`, … |
| gcp | functions-framework ASGI (gunicorn; `WORKERS` uvicorn workers) | `inference.gcp`: file, target | `/predict`, … |
| azure | uvicorn (uvloop, httptools) | `inference.azure`: the factory over the v2 `FunctionApp` | `/api/predict`, … |

Production servers only (never Flask's development server), each started through
`skyfuse.dev.launch` (the server and the app imported with the garbage collector off: a
shorter cold start). The server runs in this process's working directory, with the folders this
process imports skyfuse and the entry points from on its PYTHONPATH. It finds its cloud and store
in its environment: `SKYFUSE_CLOUD=<name>` and the fleet config (`SKYFUSE_CONFIG`, or
`SKYFUSE_CLOUDS__<NAME>__STORE=file:///…`). `start` returns once GET /health answers (200 with a
model, 503 before one); `Host.stop` sends SIGTERM to the server's process group, then SIGKILL
after a timeout (gunicorn workers holding an onnxruntime session may not exit on SIGTERM). A server
whose starting process dies without `stop` (SIGKILL, a crash) stops by itself: see `launch`.

    python -m skyfuse.dev.hosts aws --port 8081      # run one in the foreground
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import skyfuse
from skyfuse import httpclient
from skyfuse.dev import entrypoints, launch
from skyfuse.errors import Failure

PROVIDERS = ("aws", "gcp", "azure")
BASE_PATH = {"aws": "", "gcp": "", "azure": "/api"}
FUNCTION = "inference"
# what gunicorn's uvicorn worker imports as it starts (uvicorn's "auto" loop, HTTP and WebSocket
# protocols, lifespan): imported before the fork, once, with the collector off
UVICORN_WORKER = ("uvicorn.loops.uvloop", "uvicorn.protocols.http.httptools_impl", "uvicorn.protocols.websockets.auto",
                  "uvicorn.lifespan.on")


class HostError(Failure, RuntimeError):
    """A server that would not start or answer; the message carries the end of its log."""


class PortInUse(HostError):
    """Another process listens on the port: its answers would pass for the new server's."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]  # (host, port) of an AF_INET socket
        return port


def listened_on(port: int) -> bool:
    """Whether a process listens on 127.0.0.1:`port` (connections of a stopped server that linger
    in TIME_WAIT do not count: the servers bind with SO_REUSEADDR too)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def command(provider: str, port: int, workers: int | None = None) -> list[str]:
    """The server command line for `provider`'s inference entry point on 127.0.0.1:`port`."""
    # --ws none: no host serves WebSockets, so uvicorn need not import a WebSocket stack (cold start)
    uvicorn = ["--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--ws", "none",
               "--lifespan", "on", "--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "3"]
    if workers:
        uvicorn += ["--workers", str(workers)]
    # uvicorn's --workers > 1 import the app in processes of their own: nothing to import before
    own_app = not workers or workers == 1
    if provider not in PROVIDERS:
        raise HostError(f"unknown cloud provider {provider!r}; one of {', '.join(PROVIDERS)}")
    entry = entrypoints.require(FUNCTION, provider)
    if provider == "aws":
        return _launched([entry.module] if own_app else [], "uvicorn", entry.ref, *uvicorn)
    if provider == "azure":  # the entry point is the app factory
        return _launched([entry.module] if own_app else [], "uvicorn", entry.ref, "--factory", *uvicorn)
    # gcp: gunicorn's master imports the app (not before: the app prepares the workers' metrics
    # first), then forks the workers. Imported ahead of it, into memory the workers share: the core
    # (onnxruntime a worker imports itself) and what a uvicorn worker would import after the fork
    core = entrypoints.get(FUNCTION, "core")
    return _launched(["functions_framework._http.gunicorn", "functions_framework.aio", "uvicorn_worker",
                      *UVICORN_WORKER, *([core.module] if core else [])],
                     "functions_framework", "--asgi", "--target", entry.target,
                     "--source", str(entry.source()), "--signature-type", "http",
                     "--host", "127.0.0.1", "--port", str(port))


def _launched(preload: list[str], server: str, *args: str) -> list[str]:
    """`python -m server args`, started by `skyfuse.dev.launch`: the server and `preload` are
    imported with the garbage collector off, which takes about a tenth off the cold start."""
    return [sys.executable, "-m", "skyfuse.dev.launch", *preload, "--", server, *args]


def import_path(provider: str) -> list[str]:
    """The folders this process imports skyfuse and `provider`'s inference entry point from: the
    server imports the same code, installed or not."""
    roots = [str(Path(skyfuse.__file__).resolve().parent.parent),
             str(entrypoints.require(FUNCTION, provider).import_root())]
    return list(dict.fromkeys(roots))


@dataclass
class Host:
    provider: str
    port: int
    url: str  # base of the routes: url + "/predict"
    process: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str] = field(default_factory=list)
    lifeline: int | None = None  # the write end: the server stops when it closes (`skyfuse.dev.launch`)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def server_argv(self) -> list[str]:
        """The server's own command line (`uvicorn …`, `functions_framework …`), without the launcher."""
        return self.argv[self.argv.index("--") + 1:] if "--" in self.argv else self.argv[2:]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 5.0) -> int | None:
        """SIGTERM to the server's process group; SIGKILL if it is still there after `timeout_s`."""
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(10)
        self._signal(signal.SIGKILL)  # workers the leader left behind, if any
        if self.lifeline is not None:
            os.close(self.lifeline)
            self.lifeline = None
        return self.process.returncode

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)  # the group this host started (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _answers(port: int, path: str) -> httpclient.Answer | None:
    try:
        return httpclient.request("GET", f"http://127.0.0.1:{port}{path}", timeout_s=2)
    except httpclient.HttpError:
        return None


def start(cloud_provider: str, port: int | None = None, env: dict[str, str] | None = None, *,
          workers: int | None = None, timeout_s: float = 60.0, log_dir: str | os.PathLike[str] | None = None) -> Host:
    """Start `cloud_provider`'s server on 127.0.0.1:`port` (a free one when None) with `env` on top
    of this process's environment; return once GET /health answers."""
    port = port or free_port()
    if listened_on(port):  # checked first: GET /health would reach that process while ours fails to bind
        raise PortInUse(f"another process listens on 127.0.0.1:{port}, where the {cloud_provider} server was to")
    argv = command(cloud_provider, port, workers if cloud_provider != "gcp" else None)
    child = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    if not child.get("SKYFUSE_CLOUD"):
        raise HostError("set SKYFUSE_CLOUD (in env) to the cloud whose store the server reads its model from")
    if cloud_provider == "gcp":
        child.pop("DEBUG", None)  # --debug would select Flask's development server
        if workers:
            child["WORKERS"] = str(workers)
    child["PYTHONPATH"] = os.pathsep.join(p for p in (*import_path(cloud_provider), child.get("PYTHONPATH")) if p)
    log_path = Path(log_dir or tempfile.mkdtemp(prefix="skyfuse-host-")) / f"{cloud_provider}-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if cloud_provider == "gcp":  # gunicorn >= 23 opens a control socket in $XDG_RUNTIME_DIR, else ~/.gunicorn
        run_dir = log_path.parent / f"gunicorn-{port}"
        run_dir.mkdir(exist_ok=True)
        child["XDG_RUNTIME_DIR"] = str(run_dir)
    # the lifeline: the server reads end-of-file once this process is gone, however it ends
    # (os.pipe's ends are not inherited: only the server gets the read end, and nothing the write end)
    read_end, lifeline = os.pipe()
    child[launch.LIFELINE] = str(read_end)
    try:
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(argv, env=child, stdin=subprocess.DEVNULL, stdout=log_file,
                                       stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(read_end,))
    except BaseException:
        os.close(lifeline)
        raise
    finally:
        os.close(read_end)
    base = BASE_PATH[cloud_provider]
    host = Host(cloud_provider, port, f"http://127.0.0.1:{port}{base}", process, log_path, argv, lifeline)
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            host.stop()  # anything the server left in its process group
            raise HostError(f"{cloud_provider} server exited with {process.returncode} before answering; "
                            f"command: {' '.join(argv)}\n{host.log()[-4000:]}")
        answer = _answers(port, f"{base}/health")
        if answer is not None:
            if answer.status in (200, 503):  # serving, or up and waiting for its first model
                return host
            host.stop()
            raise HostError(f"{cloud_provider} server answered GET {base}/health with {answer.status}: "
                            f"{answer.body[:500]!r}\n{host.log()[-4000:]}")
        if time.monotonic() > deadline:
            host.stop()
            raise HostError(f"{cloud_provider} server did not answer GET {base}/health within {timeout_s:.0f} s\n"
                            f"{host.log()[-4000:]}")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m skyfuse.dev.hosts", description=__doc__.split("\n")[0])
    parser.add_argument("provider", choices=PROVIDERS)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    host = start(args.provider, args.port, workers=args.workers)
    print(f"{args.provider} inference on {host.url} (pid {host.pid}, log {host.log_path}); Ctrl-C stops it")
    try:
        host.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        host.stop()


if __name__ == "__main__":
    main()
