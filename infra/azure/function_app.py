"""One Azure Functions app (Python v2 model) with every skyfuse function of the `azure` cloud.

The same entry points `skyfuse up` hosts locally: the Kafka triggers come from
`skyfuse.runtime.clouds.azure.register_kafka_triggers` with each function's handler core, exactly
as `services/<fn>/azure.py` registers them (one trigger per catalog topic, consumer group
`%SKYFUSE_CLOUD%.<fn>`, brokers from the `KafkaBrokerList` app setting); the inference routes are
the ones `services/inference/azure.py` declares; the timer cores (`on_timer`) run every minute,
what `skyfuse.dev.fleet.TimerHost` plays locally.

Deploy the repo root with this file, host.json and requirements.txt copied next to it (see
infra/README.md); the repo's `services/` and `shared/skyfuse/` must be importable.
"""
from __future__ import annotations

import sys
from pathlib import Path

_root = Path(__file__).resolve().parent
for _candidate in (_root, _root.parent.parent):  # deployed package root, or this checkout
    if (_candidate / "services").is_dir():
        for _path in (_candidate, _candidate / "shared"):
            if str(_path) not in sys.path:
                sys.path.insert(0, str(_path))
        break

import azure.functions as func  # noqa: E402

from services.deployer.handler import handle as deployer  # noqa: E402
from services.exporter.handler import handle as exporter  # noqa: E402
from services.fuser.handler import handle as fuser  # noqa: E402
from services.inference import azure as inference  # noqa: E402
from services.scheduler.handler import handle as scheduler  # noqa: E402
from services.trainer.handler import handle as trainer  # noqa: E402
from skyfuse.runtime.clouds.azure import register_kafka_triggers  # noqa: E402
from skyfuse.runtime.function import current  # noqa: E402

KAFKA_FUNCTIONS = {"trainer": trainer, "exporter": exporter, "fuser": fuser,
                   "scheduler": scheduler, "deployer": deployer}
TIMER_SCHEDULE = "0 */1 * * * *"  # NCRONTAB (with seconds): every minute

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)

for _name, _handle in KAFKA_FUNCTIONS.items():
    register_kafka_triggers(app, _name, _handle)

# services/inference/azure.py declares its routes on its own FunctionApp, not a Blueprint, and
# FunctionApp.register_functions refuses another FunctionApp; take its function builders, which
# is all register_functions would do with a Blueprint.
app._function_builders.extend(inference.app._function_builders)


@app.function_name("monitor_timer")
@app.timer_trigger(arg_name="timer", schedule=TIMER_SCHEDULE, run_on_startup=False, use_monitor=True)
def monitor_timer(timer: func.TimerRequest) -> None:
    from services.monitor.handler import on_timer

    on_timer(current("monitor"))


@app.function_name("fuser_quorum_timer")
@app.timer_trigger(arg_name="timer", schedule=TIMER_SCHEDULE, run_on_startup=False, use_monitor=True)
def fuser_quorum_timer(timer: func.TimerRequest) -> None:
    from services.fuser.handler import on_timer

    on_timer(current("fuser"))
