"""Google Cloud entry points of the timer cores: functions-framework HTTP targets that Cloud
Scheduler calls every minute (what `skyfuse.dev.fleet.TimerHost` plays locally)."""
import functions_framework

from skyfuse.runtime.function import current


@functions_framework.http
def monitor_timer(request):
    from services.monitor.handler import on_timer

    on_timer(current("monitor"))
    return "ok", 200


@functions_framework.http
def fuser_quorum_timer(request):
    from services.fuser.handler import on_timer

    on_timer(current("fuser"))
    return "ok", 200
