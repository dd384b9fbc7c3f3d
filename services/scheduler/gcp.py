"""Google Cloud entry point of the scheduler: functions-framework, target `scheduler`, signature cloudevent."""
import functions_framework
from cloudevents.http import CloudEvent

from services.scheduler.handler import handle
from skyfuse.runtime.clouds.gcp import deliver_cloud_event


@functions_framework.cloud_event
def scheduler(cloud_event: CloudEvent) -> None:
    deliver_cloud_event("scheduler", handle, cloud_event)
