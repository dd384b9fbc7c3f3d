"""Run each cloud's inference entry point behind a real HTTP server on 127.0.0.1, as a subprocess.

| provider | server | serves |
| --- | --- | --- |
| aws | uvicorn (uvloop, httptools): Powertools `HttpResolverLocal` routes of `services.inference.aws` | `/predict`, … |
| gcp | functions-framework's ASGI mode (gunicorn, uvicorn workers; `WORKERS`): `services/inference/gcp.py`, target `inference` | `/predict`, … |
| azure | uvicorn (uvloop, httptools): `services.inference.azure_host`, the v2 `FunctionApp` of `services.inference.azure` | `/api/predict`, … |

Production servers only (never Flask's development server), each started through
`skyfuse.serving.launch` (the server and the app imported with the garbage collector off: a
shorter cold start). The serving process finds its cloud and store in its environment:
`SKYFUSE_CLOUD=<name>` and the fleet config (`SKYFUSE_CONFIG`, or
`SKYFUSE_CLOUDS__<NAME>__STORE=file:///…`). `start` returns once GET /health answers (200 with a
model, 503 before one); `Host.stop` sends SIGTERM to the server's process group, then SIGKILL
after a timeout (gunicorn workers holding an onnxruntime session may not exit on SIGTERM).

    python -m skyfuse.serving.hosts aws --port 8081      # run one in the foreground
"""
from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PROVIDERS = ("aws", "gcp", "azure")
REPO = Path(__file__).resolve().parents[3]
BASE_PATH = {"aws": "", "gcp": "", "azure": "/api"}


class HostError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(provider: str, port: int, workers: int | None = None) -> list[str]:
    """The server command line for `provider`'s inference entry point on 127.0.0.1:`port`."""
    # --ws none: no host serves WebSockets, so uvicorn need not import a WebSocket stack (cold start)
    uvicorn = ["--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--ws", "none",
               "--lifespan", "on", "--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "3"]
    if workers:
        uvicorn += ["--workers", str(workers)]
    # uvicorn's --workers > 1 import the app in processes of their own: nothing to import before
    own_app = not workers or workers == 1
    if provider == "aws":
        return _launched(["services.inference.aws"] if own_app else [],
                         "uvicorn", "services.inference.aws:asgi", *uvicorn)
    if provider == "azure":
        return _launched(["services.inference.azure_host", "services.inference.azure"] if own_app else [],
                         "uvicorn", "services.inference.azure_host:create_app", "--factory", *uvicorn)
    if provider == "gcp":  # gunicorn's master imports the app, then forks the workers
        return _launched(["functions_framework._http.gunicorn", "functions_framework.aio", "uvicorn_worker",
                          "services.inference.handler"],
                         "functions_framework", "--asgi", "--target", "inference",
                         "--source", str(REPO / "services" / "inference" / "gcp.py"), "--signature-type", "http",
                         "--host", "127.0.0.1", "--port", str(port))
    raise HostError(f"unknown cloud provider {provider!r}; one of {', '.join(PROVIDERS)}")


def _launched(preload: list[str], server: str, *args: str) -> list[str]:
    """`python -m server args`, started by `skyfuse.serving.launch`: the server and `preload` are
    imported with the garbage collector off, which takes about a tenth off the cold start."""
    return [sys.executable, "-m", "skyfuse.serving.launch", *preload, "--", server, *args]


@dataclass
class Host:
    provider: str
    port: int
    url: str  # base of the routes: url + "/predict"
    process: subprocess.Popen
    log_path: Path
    argv: list[str] = field(default_factory=list)

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
        return self.process.returncode

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)  # the group this host started (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "Host":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _answers(port: int, path: str) -> tuple[int, bytes] | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except OSError:
        return None
    finally:
        conn.close()


def start(cloud_provider: str, port: int | None = None, env: dict[str, str] | None = None, *,
          workers: int | None = None, timeout_s: float = 60.0, log_dir: str | os.PathLike | None = None) -> Host:
    """Start `cloud_provider`'s server on 127.0.0.1:`port` (a free one when None) with `env` on top
    of this process's environment; return once GET /health answers."""
    port = port or free_port()
    argv = command(cloud_provider, port, workers if cloud_provider != "gcp" else None)
    child = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    if not child.get("SKYFUSE_CLOUD"):
        raise HostError("set SKYFUSE_CLOUD (in env) to the cloud whose store the server reads its model from")
    if cloud_provider == "gcp":
        child.pop("DEBUG", None)  # --debug would select Flask's development server
        if workers:
            child["WORKERS"] = str(workers)
    child["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(REPO / "shared"), child.get("PYTHONPATH")) if p)
    log_path = Path(log_dir or tempfile.mkdtemp(prefix="skyfuse-host-")) / f"{cloud_provider}-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if cloud_provider == "gcp":  # gunicorn >= 23 opens a control socket in $XDG_RUNTIME_DIR, else ~/.gunicorn
        run_dir = log_path.parent / f"gunicorn-{port}"
        run_dir.mkdir(exist_ok=True)
        child["XDG_RUNTIME_DIR"] = str(run_dir)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(argv, cwd=REPO, env=child, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    base = BASE_PATH[cloud_provider]
    host = Host(cloud_provider, port, f"http://127.0.0.1:{port}{base}", process, log_path, argv)
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            host.stop()  # anything the server left in its process group
            raise HostError(f"{cloud_provider} server exited with {process.returncode} before answering; "
                            f"command: {' '.join(argv)}\n{host.log()[-4000:]}")
        answer = _answers(port, f"{base}/health")
        if answer is not None:
            if answer[0] in (200, 503):  # serving, or up and waiting for its first model
                return host
            host.stop()
            raise HostError(f"{cloud_provider} server answered GET {base}/health with {answer[0]}: "
                            f"{answer[1][:500]!r}\n{host.log()[-4000:]}")
        if time.monotonic() > deadline:
            host.stop()
            raise HostError(f"{cloud_provider} server did not answer GET {base}/health within {timeout_s:.0f} s\n"
                            f"{host.log()[-4000:]}")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m skyfuse.serving.hosts", description=__doc__.split("\n")[0])
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
