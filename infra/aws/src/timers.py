"""Lambda entry points of the timer-driven cores (EventBridge Scheduler `Schedule` events).

The local fleet plays these with `skyfuse.dev.fleet.TimerHost`, which calls a core's
`on_timer(runtime)` every `training.timer_s`; on AWS a `rate(1 minute)` schedule calls these.
The scheduled event's payload carries nothing the cores need, so it is ignored.
"""
from skyfuse.runtime.function import current


def monitor(event, context):
    from services.monitor.handler import on_timer

    on_timer(current("monitor"))
    return {"ok": True}


def fuser_quorum(event, context):
    from services.fuser.handler import on_timer

    on_timer(current("fuser"))
    return {"ok": True}
