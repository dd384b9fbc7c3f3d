"""The whole fleet on one machine: what `skyfuse up` runs (and `skyfuse demo` when no `up` is).

Per cloud: an inference server (a real HTTP server, the cloud's own entry point) on 127.0.0.1, and
in this process a function host for every event-triggered function plus the timers (the fuser's
quorum check, the monitor). `.skyfuse/endpoints.json` tells other commands (`status`, `predict`,
`demo`) that a fleet is up and where each cloud serves.
"""
from __future__ import annotations

import fcntl
import importlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from skyfuse import files
from skyfuse.bus.base import Bus
from skyfuse.config import Fleet, as_dict
from skyfuse.dev.fleet import Fabric, build_hosts, build_timers
from skyfuse.runtime.host import Listener
from skyfuse.serving import api
from skyfuse.storage import open_store

if TYPE_CHECKING:  # the servers and the router load when a fleet serves
    from wsgiref.simple_server import WSGIServer

    from skyfuse.dev.hosts import Host
    from skyfuse.dev.router import RouterServer

ENDPOINTS = Path(".skyfuse/endpoints.json")
LOCAL_POINTER_POLL_S = "0.1"  # the servers' default, 0.5 s, suits a cloud's object store
WARM_IMPORTS = {"trainer": ("skyfuse.ml.model",), "exporter": ("skyfuse.ml.model", "tf2onnx")}
FIRST_PORT = 8101


def api_key(fleet: Fleet) -> str:
    """The API key of the local fleet's inference servers, made on first use: `<keys_dir>/inference-api-key`
    (mode 0600). The servers get only its digest; `skyfuse predict` and the demo send it."""
    import secrets

    from skyfuse import signing

    path = Path(fleet.signing.keys_dir) / "inference-api-key"
    if not path.exists():  # of commands starting at once (`up`, `predict`), the first one's key stands
        signing.write_secret(path, f"sfk_{secrets.token_urlsafe(32)}".encode(), replace=False)
    return path.read_text().strip()


def prepare(fleet: Fleet) -> None:
    """What a local fleet needs before it starts: its signing keys and its inference API key."""
    from skyfuse import signing

    signing.ensure_local_keys(fleet)
    api_key(fleet)


def serving_env(fleet: Fleet, cloud: str) -> dict[str, str]:
    """What a serving process needs to find its cloud, its store and the bus: absolute paths, since
    the servers do not run in this working directory."""
    env = {"SKYFUSE_CLOUD": cloud}
    if fleet.clouds[cloud].store.startswith("file://"):  # the serving pointer is a local file: reading it is free
        env["INFERENCE_POLL_S"] = LOCAL_POINTER_POLL_S
    for name, settings in fleet.clouds.items():
        store = settings.store
        env[f"SKYFUSE_CLOUDS__{name.upper()}__STORE"] = open_store(store).uri if store.startswith("file://") else store
    env["SKYFUSE_BUS__BACKEND"] = fleet.bus.backend
    env["SKYFUSE_BUS__EMBEDDED__PATH"] = str(Path(fleet.bus.embedded.path).resolve())
    for key, value in as_dict(fleet.bus.kafka).items():  # brokers, TLS and SASL alike, as TOML values
        if key.startswith("ssl_") and key.endswith("file") and value:
            value = str(Path(value).resolve())
        env[f"SKYFUSE_BUS__KAFKA__{key.upper()}"] = orjson.dumps(value).decode()
    if fleet.tracing.otlp_endpoint:
        env["SKYFUSE_TRACING__OTLP_ENDPOINT"] = fleet.tracing.otlp_endpoint
    env["SKYFUSE_SIGNING__ENABLED"] = str(fleet.signing.enabled).lower()
    env["SKYFUSE_SIGNING__KEYS_DIR"] = str(Path(fleet.signing.keys_dir).resolve())
    env["INFERENCE_API_KEY_HASHES"] = api.key_hash(api_key(fleet))
    if fleet.source:  # the file this fleet came from (--config, $SKYFUSE_CONFIG or ./skyfuse.toml)
        env["SKYFUSE_CONFIG"] = fleet.source
    return env


class LocalFleet:
    def __init__(self, fleet: Fleet, bus: Bus, listener: Listener | None = None, *,
                 functions: list[str] | None = None, clouds: list[str] | None = None, serve: bool = True,
                 metrics_port: int = 0, router_port: int = 0) -> None:
        self.fleet, self.bus, self.listener = fleet, bus, listener
        self.functions, self.clouds, self.serve = functions, clouds or list(fleet.clouds), serve
        self.metrics_port = metrics_port  # 0: the function hosts' /metrics is off
        self.router_port = router_port  # 0: no front door (skyfuse.dev.router)
        self.router: RouterServer | None = None
        self.servers: dict[str, Host] = {}
        self.fabric: Fabric | None = None
        self._metrics_server: WSGIServer | None = None
        self._folder_lock: IO[str] | None = None

    def start(self) -> LocalFleet:
        """Start every part; when one fails, stop what started (no orphaned servers) and raise."""
        self._warm_imports()
        prepare(self.fleet)
        try:
            if self.serve:
                self._serve()
            metrics = None
            if self.metrics_port:
                from skyfuse.runtime.metrics import HostMetrics

                metrics = HostMetrics()
                self._metrics_server, _ = metrics.serve(self.metrics_port)
            self.hosts = build_hosts(self.fleet, self.bus, self.listener, functions=self.functions,
                                     clouds=self.clouds, metrics=metrics)
            timers = build_timers(self.fleet, self.bus, functions=self.functions, clouds=self.clouds)
            self.fabric = Fabric(self.hosts, timers).start()
        except BaseException:
            self.stop()
            raise
        return self

    def _warm_imports(self) -> None:
        """Import what the first events' functions will (TensorFlow for the trainers, tf2onnx for
        the exporters: seconds) in the background, while the servers start."""
        modules = dict.fromkeys(m for f in self.functions or list(WARM_IMPORTS) for m in WARM_IMPORTS.get(f, ()))

        def warm() -> None:
            for module in modules:
                importlib.import_module(module)

        if modules:
            threading.Thread(target=warm, name="warm-imports", daemon=True).start()

    def _serve(self) -> None:
        """Each cloud's inference server, then the router in front of them; endpoints.json says where."""
        from skyfuse.dev import hosts

        self._claim_folder()

        def start(cloud: str) -> Host:
            settings = self.fleet.clouds[cloud]
            port = settings.inference_port or FIRST_PORT + list(self.fleet.clouds).index(cloud)
            try:
                return hosts.start(settings.provider, port, serving_env(self.fleet, cloud),
                                   log_dir=Path(".skyfuse/logs").resolve())
            except hosts.PortInUse as exc:
                raise hosts.PortInUse(f"{exc} ({cloud}'s inference): set clouds.{cloud}.inference_port "
                                      "to a free port") from None

        # all at once: each start is mostly a wait for the process to answer
        with ThreadPoolExecutor(len(self.clouds)) as pool:
            starting = {cloud: pool.submit(start, cloud) for cloud in self.clouds}
        failures = [error for future in starting.values() if (error := future.exception()) is not None]
        for cloud, future in starting.items():
            if future.exception() is None:
                self.servers[cloud] = future.result()  # stopped by stop(), whatever else failed
                self.fleet.clouds[cloud].endpoint = self.servers[cloud].url  # deployment.status reports it
        if failures:
            raise failures[0]
        if self.router_port:
            from skyfuse.dev.router import Placement, Router, RouterServer

            endpoints = {c: s.url for c, s in self.servers.items()}
            self.router = RouterServer(Router(endpoints, Placement(self.fleet, self.bus)), self.router_port).start()
        _write_endpoints({"pid": os.getpid(), "clouds": {c: s.url for c, s in self.servers.items()},
                          **({"router": self.router.url} if self.router else {})})

    def _claim_folder(self) -> None:
        """One serving fleet per folder: the ports and endpoints.json are the folder's. A second
        fleet that started too would find its ports answered by the first's servers."""
        from skyfuse.dev.hosts import HostError

        ENDPOINTS.parent.mkdir(parents=True, exist_ok=True)
        lock = open(ENDPOINTS.with_name("up.lock"), "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the OS releases it if this process dies
        except BlockingIOError:
            lock.close()
            raise HostError(f"a fleet is already up in this folder ({ENDPOINTS.parent.resolve()}); stop it "
                            "first, or use --no-serve") from None
        self._folder_lock = lock

    def stop(self) -> None:
        if self.fabric:
            self.fabric.stop()
        if self._metrics_server:
            self._metrics_server.shutdown()
            self._metrics_server = None
        if self.router:
            self.router.stop()
            self.router = None
        with ThreadPoolExecutor(max(1, len(self.servers))) as pool:  # each stop may wait for its process
            list(pool.map(lambda server: server.stop(), self.servers.values()))
        if self.servers and _endpoints().get("pid") == os.getpid():
            ENDPOINTS.unlink()
        self.servers = {}
        if self._folder_lock:
            self._folder_lock.close()  # releases the flock
            self._folder_lock = None

    def __enter__(self) -> LocalFleet:
        return self if self.fabric else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def record_gateway(cloud: str, url: str) -> None:
    """Note an API gateway in front of a cloud's endpoint (`skyfuse up --emulate` for aws)."""
    info = orjson.loads(ENDPOINTS.read_bytes())
    info.setdefault("gateways", {})[cloud] = url
    _write_endpoints(info)


def _write_endpoints(info: dict[str, object]) -> None:
    """Whole or not at all: other commands read the file at any moment (`running`)."""
    files.write_atomic(ENDPOINTS, orjson.dumps(info))


def _endpoints() -> dict[str, Any]:
    """endpoints.json as `LocalFleet` wrote it; empty if there is none."""
    try:
        info = orjson.loads(ENDPOINTS.read_bytes())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def router() -> str | None:
    """The front door of the fleet `skyfuse up` runs from this folder, if it has one."""
    return _endpoints().get("router") if running() else None


def running() -> dict[str, str] | None:
    """cloud → endpoint of the fleet `skyfuse up` is running from this folder, if one is."""
    info = _endpoints()
    try:
        os.kill(info["pid"], 0)
    except (OSError, KeyError, TypeError):
        return None
    clouds: dict[str, str] = info["clouds"]  # as `LocalFleet` wrote it
    return clouds
