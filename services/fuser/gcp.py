"""Google Cloud entry point of the fuser: functions-framework, target `fuser`, signature cloudevent."""
import functions_framework
from cloudevents.http import CloudEvent

from services.fuser.handler import handle
from skyfuse.runtime.clouds.gcp import deliver_cloud_event


@functions_framework.cloud_event
def fuser(cloud_event: CloudEvent) -> None:
    deliver_cloud_event("fuser", handle, cloud_event)
