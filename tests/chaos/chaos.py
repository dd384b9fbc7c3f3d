"""`make chaos`: a whole run on the real Kafka broker while hosts are killed, then a ledger check.

    .venv/bin/python -m tests.chaos.chaos [--shards 30] [--kill-every 2 5] [--broker-restart] [--seed 0]

Two `skyfuse up --no-serve` processes host every function of every cloud, so each consumer group
(`<cloud>.<function>`) has two members. A run of N shards over aws, gcp and azure (one shard
every third cloud, synthetic rows) is published; while it trains, exports, fuses, is placed and
deployed, a driver SIGKILLs one of the two processes at random every few seconds and starts it
again, and (with --broker-restart) restarts the broker once, after the third kill, while the
shards train. When the fused model is served, or
the deadline passes, the processes are stopped and the ledger reads every effect of the run:

- events on every topic, by what they are (model.ready per shard, onnx.ready per shard, one
  fused.ready, placement.changed per decision, deployment.status per decision, cloud and state):
  *missing* when absent, *duplicated* when one of them was published under two ids (an effect
  applied twice; a redelivery repeats the same id and is not counted);
- stored objects: each shard's Keras and ONNX model, the fused model, the serving pointer of
  every placed cloud naming the fused version;
- *unexpected*: a dead letter of the run, an event of the run for a shard that does not exist,
  an idempotency claim of the run still in progress at the end.

It prints one last line `chaos: shards=N missing=M duplicated=D unexpected=U` and exits 1 unless
M = D = U = 0, the run fused and was served, and the broker restarted if asked to. 127.0.0.1 only;
bounded by --deadline.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
from kafka.errors import KafkaError

from skyfuse import config, contracts, events, signing
from skyfuse.bus import open_bus
from skyfuse.bus.kafka import KafkaUnavailable
from skyfuse.ml import data as mldata
from skyfuse.runtime import deadletter
from skyfuse.serving.model import POINTER_KEY
from skyfuse.storage import keys, open_store

REPO = Path(__file__).resolve().parents[2]
CLOUDS = ("aws", "gcp", "azure")
ROWS_PER_SHARD = 80
FEATURES = 8


def fleet_env(workdir: Path, bootstrap: str) -> dict[str, str]:
    env = {
        "SKYFUSE_BUS__BACKEND": "kafka", "SKYFUSE_BUS__KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "SKYFUSE_BUS__KAFKA__SESSION_TIMEOUT_MS": "6000",
        "SKYFUSE_DELIVERY__BACKOFF_INITIAL_S": "0.1", "SKYFUSE_DELIVERY__BACKOFF_MAX_S": "2",
        "SKYFUSE_DELIVERY__MAX_ATTEMPTS": "10", "SKYFUSE_DELIVERY__CLAIM_TIMEOUT_S": "20",
        "SKYFUSE_TRAINING__EPOCHS": "5", "SKYFUSE_TRAINING__HIDDEN": "[16]", "SKYFUSE_TRAINING__TIMER_S": "1",
    }
    env.update({f"SKYFUSE_CLOUDS__{c.upper()}__STORE": f"file://{workdir}/stores/{c}" for c in CLOUDS})
    env["SKYFUSE_SIGNING__KEYS_DIR"] = str(workdir / "keys")
    return env


# -- the run ------------------------------------------------------------------------------------

def synthetic(rows: int, seed: int) -> mldata.Dataset:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    y = (X @ rng.normal(size=FEATURES) + 0.3 * rng.normal(size=rows) > 0).astype(np.int64)
    return mldata.Dataset(X, y, [f"f{i}" for i in range(FEATURES)], [0, 1], target="label")


def prepare(fleet, run_id: str, shards: int, seed: int) -> list:
    """Shards in their clouds' stores, run.json and validation rows in the control store; returns
    the shard.ready events."""
    control = open_store(fleet.clouds["aws"].store)
    control.put(keys.run_info(run_id), orjson.dumps(
        {"target": "label", "classes": [0, 1], "features": [f"f{i}" for i in range(FEATURES)], "task": "binary"}))
    control.put(keys.validation(run_id), mldata.to_csv_bytes(synthetic(200, seed + 1)))
    manifest = {"expected_members": shards, "clouds": list(CLOUDS), "quorum": shards, "timeout_s": 3600,
                "fusion": "wavg", "rounds": 1}
    out = []
    signer = signing.signer_for(fleet, signing.CLI)  # the run is started as `skyfuse train` starts it
    for i in range(shards):
        cloud = CLOUDS[i % len(CLOUDS)]
        saved = open_store(fleet.clouds[cloud].store).put(
            keys.shard(run_id, str(i)), mldata.to_csv_bytes(synthetic(ROWS_PER_SHARD, seed + 100 + i)))
        out.append(events.new_event("shard.ready", {
            "run_id": run_id, "round": 0, "shard_id": str(i), "cloud": cloud, "uri": saved.uri,
            "sha256": saved.sha256, "bytes": saved.size, "rows": ROWS_PER_SHARD,
            "features": [f"f{i}" for i in range(FEATURES)], "target": "label", "task": "binary", "classes": [0, 1],
            "partition": "iid", "manifest": manifest, "model": {"seed": seed}}, source=signing.source_of(signing.CLI),
            subject=cloud))
        signer.sign(out[-1])
    return out


# -- the processes ------------------------------------------------------------------------------

class Hosts:
    """Two `skyfuse up --no-serve` processes, each hosting every function of every cloud."""

    def __init__(self, workdir: Path, env: dict[str, str], count: int = 2):
        self.workdir, self.env = workdir, {**os.environ, **env}
        self.procs: list[subprocess.Popen | None] = [None] * count
        self.kills = 0

    def start(self, i: int) -> None:
        log = open(self.workdir / f"host-{i}.log", "ab")
        self.procs[i] = subprocess.Popen(
            [sys.executable, "-m", "skyfuse.cli", "up", "--no-serve", "--for", "3600"], cwd=self.workdir,
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_all(self) -> None:
        for i in range(len(self.procs)):
            self.start(i)

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            self.kills += 1

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def broker(command: str) -> None:
    subprocess.run(["bash", str(REPO / "infra/kafka/kafka.sh"), command], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)


BROKER_RESTART_AFTER_KILLS = 3  # early, whatever the run's length: the shards are still training


def chaos(hosts: Hosts, stop: threading.Event, rng: random.Random, every: tuple[float, float], kills: int | None,
          broker_restarted: threading.Event | None, log) -> None:
    """Kill a host every few seconds; with `broker_restarted`, restart the broker once and set it."""
    while not stop.wait(rng.uniform(*every)):
        if kills is not None and hosts.kills >= kills:
            return
        victim = rng.randrange(len(hosts.procs))
        hosts.kill(victim)
        log(f"killed host {victim} (SIGKILL #{hosts.kills}); restarting it")
        hosts.start(victim)
        if broker_restarted and not broker_restarted.is_set() and hosts.kills >= BROKER_RESTART_AFTER_KILLS:
            log("restarting the Kafka broker")
            broker("down")
            broker("up")
            broker_restarted.set()
            log("broker back")


# -- the ledger -------------------------------------------------------------------------------

def ledger(fleet, bus, run_id: str, shards: int) -> dict:
    """Every effect of the run, checked (see the module doc)."""
    ids: dict[tuple, set[str]] = defaultdict(set)
    unexpected: list[str] = []
    fused = None
    runs_versions: set[str] = set()
    for name in ("model.ready", "onnx.ready", "fused.ready"):
        for record in bus.read(contracts.event_type(name).topic, 10_000_000):
            event = events.decode(record.key, record.value, record.headers)
            data = event.get_data()
            if data.get("run_id") != run_id:
                continue
            if name == "fused.ready":
                ids[(name,)].add(event["id"])
                fused = data
                runs_versions.add(data["version"])
                continue
            if data["shard_id"] not in {str(i) for i in range(shards)} or data["round"] != 0:
                unexpected.append(f"{name} for shard {data['shard_id']} round {data['round']}")
            ids[(name, data["shard_id"])].add(event["id"])
    last = None  # the decision in force for the fused version
    for name, keyof in (("placement.changed", lambda d: (d["decision_id"],)),
                        ("deployment.status", lambda d: (d["decision_id"], d["cloud"], d["state"]))):
        for record in bus.read(contracts.event_type(name).topic, 10_000_000):
            event = events.decode(record.key, record.value, record.headers)
            data = event.get_data()
            if data["model_version"] in runs_versions:
                ids[(name, *keyof(data))].add(event["id"])
                if name == "placement.changed":
                    last = data
    for function in ("trainer", "exporter", "fuser", "scheduler", "deployer"):
        for record in bus.read(contracts.dlq_topic(function), 10_000_000):
            try:
                data = orjson.loads(record.value)
            except orjson.JSONDecodeError:
                continue
            mine = isinstance(data, dict) and (data.get("run_id") == run_id
                                               or data.get("model_version") in runs_versions)
            if mine:
                unexpected.append(f"dead letter in {function}: {deadletter.describe(record.headers).get('reason')}")
    expected = [("model.ready", str(i)) for i in range(shards)] + [("onnx.ready", str(i)) for i in range(shards)]
    expected.append(("fused.ready",))
    missing = [f"{' '.join(key)}: no event" for key in expected if not ids.get(key)]
    duplicated = [f"{' '.join(key)}: {len(found)} ids" for key, found in ids.items() if len(found) > 1]
    for i in range(shards):
        cloud = CLOUDS[i % len(CLOUDS)]
        store = open_store(fleet.clouds[cloud].store)
        for kind, key in (("keras", keys.member_model(run_id, 0, cloud, str(i))),
                          ("onnx", keys.member_onnx(run_id, 0, cloud, str(i)))):
            if not store.exists(key):
                missing.append(f"stored {kind} model of shard {i} in {cloud}")
    served = False
    if fused is not None:
        control = open_store(fleet.clouds["aws"].store)
        if not control.exists(keys.fused_model(run_id, fused["version"])):
            missing.append("stored fused model")
        placed = [p["cloud"] for p in (last or {}).get("placements", []) if p["weight"] > 0]
        pointers = {}
        for cloud in placed:
            store = open_store(fleet.clouds[cloud].store)
            pointers[cloud] = orjson.loads(store.get(POINTER_KEY)) if store.exists(POINTER_KEY) else None
        served = bool(placed) and all((p or {}).get("version") == fused["version"] for p in pointers.values())
        for cloud in placed:  # the decision in force was applied in each cloud it placed
            if not ids.get(("deployment.status", last["decision_id"], cloud, "serving")):
                missing.append(f"deployment.status serving of {last['decision_id']} in {cloud}")
    for cloud in CLOUDS:
        store = open_store(fleet.clouds[cloud].store)
        for key in store.list("idempotency/"):
            record = orjson.loads(store.get(key))
            if run_id in record.get("key", "") and record.get("status") != "completed":
                unexpected.append(f"claim {record['key']} left {record.get('status')} in {cloud}")
    return {"shards": shards, "missing": missing, "duplicated": duplicated, "unexpected": unexpected,
            "fused": fused is not None, "served": served, "version": fused and fused["version"]}


# -- the whole ----------------------------------------------------------------------------------

def run(shards: int, every: tuple[float, float], kills: int | None, broker_restart: bool, seed: int,
        deadline_s: float, bootstrap: str, workdir: Path, log=print) -> dict:
    env = fleet_env(workdir, bootstrap)
    fleet = config.load(environ=env)
    signing.ensure_local_keys(fleet)
    bus = open_bus(fleet)
    run_id = f"chaos-{seed}-{os.urandom(3).hex()}"
    hosts = Hosts(workdir, env)
    stop = threading.Event()
    broker_restarted = threading.Event() if broker_restart else None
    started = time.monotonic()
    try:
        from skyfuse.cli.common import all_topics

        bus.ensure_topics(all_topics(fleet), fleet.bus.partitions)
        shard_events = prepare(fleet, run_id, shards, seed)
        # once, before any kill: a fresh clone's first import of TensorFlow compiles its bytecode
        # for a minute, which hosts killed every few seconds would otherwise redo again and again
        subprocess.run([sys.executable, "-c", "import skyfuse.ml.model, skyfuse.ml.export"], check=True)
        hosts.start_all()
        driver = threading.Thread(target=chaos, args=(hosts, stop, random.Random(seed), every, kills,
                                                      broker_restarted, log), daemon=True)
        driver.start()
        for event in shard_events:
            key, value, headers = events.encode(event)
            bus.publish(events.topic_of(event), value, key, headers)
        log(f"run {run_id}: {shards} shards published over {', '.join(CLOUDS)}; chaos on")
        result = {}
        while time.monotonic() - started < deadline_s:
            try:
                result = ledger(fleet, bus, run_id, shards)
            except (KafkaUnavailable, KafkaError) as exc:  # the broker restarting: look again in a while
                log(f"  {time.monotonic() - started:5.0f} s: the ledger cannot read the bus now ({exc})")
                time.sleep(5)
                continue
            log(f"  {time.monotonic() - started:5.0f} s: {_progress(result, shards)}")
            if result["served"] and not result["missing"]:
                break
            time.sleep(5)
        stop.set()
        driver.join(60)
        for i, proc in enumerate(hosts.procs):  # everyone up, so the redeliveries settle
            if proc is None or proc.poll() is not None:
                hosts.start(i)
        _settle(bus, fleet, deadline=time.monotonic() + 90)
    finally:
        stop.set()
        hosts.stop_all()
    result = ledger(fleet, bus, run_id, shards)
    bus.close()
    result.update(seconds=round(time.monotonic() - started, 1), kills=hosts.kills, run_id=run_id,
                  broker_restarted=bool(broker_restarted and broker_restarted.is_set()))
    return result


def _settle(bus, fleet, deadline: float) -> None:
    """Wait until every function group has handled everything on its topics."""
    from skyfuse.contracts import event_functions

    groups = [(f"{c}.{f}", t) for f in event_functions() for c in fleet.clouds_for(f) for t in contracts.topics_for(f)]
    while time.monotonic() < deadline:
        if all(bus.lag(group, topic) == 0 for group, topic in groups):
            return
        time.sleep(1)


def _progress(result: dict, shards: int) -> str:
    trained = shards - sum(m.startswith("model.ready") for m in result["missing"])
    exported = shards - sum(m.startswith("onnx.ready") for m in result["missing"])
    return (f"trained {trained}/{shards}, exported {exported}/{shards}, fused {'yes' if result['fused'] else 'no'}, "
            f"served {'yes' if result['served'] else 'no'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=30)
    parser.add_argument("--kill-every", type=float, nargs=2, default=(2.0, 5.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--kills", type=int, default=None, help="stop killing after this many (default: no limit)")
    parser.add_argument("--broker-restart", action="store_true", help="restart the broker once, early in the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=1200.0, help="seconds before giving up")
    parser.add_argument("--bootstrap", default=os.environ.get("SKYFUSE_TEST_KAFKA", "127.0.0.1:9092"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="skyfuse-chaos-") as tmp:
        result = run(args.shards, tuple(args.kill_every), args.kills, args.broker_restart, args.seed, args.deadline,
                     args.bootstrap, Path(tmp))
    for kind in ("missing", "duplicated", "unexpected"):
        for line in result[kind][:20]:
            print(f"  {kind}: {line}")
    restart = f", broker restarted {'yes' if result['broker_restarted'] else 'NO'}" if args.broker_restart else ""
    print(f"run {result['run_id']}: {result['kills']} hosts killed{restart}, {result['seconds']} s, "
          f"fused {'yes' if result['fused'] else 'NO'}, served {'yes' if result['served'] else 'NO'}")
    print(f"chaos: shards={result['shards']} missing={len(result['missing'])} duplicated={len(result['duplicated'])} "
          f"unexpected={len(result['unexpected'])}")
    lost_or_wrong = result["missing"] or result["duplicated"] or result["unexpected"]
    restarted_as_asked = result["broker_restarted"] == args.broker_restart
    ok = result["fused"] and result["served"] and not lost_or_wrong and restarted_as_asked
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
