"""Google Cloud entry point of the router: functions-framework, target `router`, signature cloudevent."""
import functions_framework
from cloudevents.http import CloudEvent

from services.router.handler import handle
from skyfuse.runtime.clouds.gcp import deliver_cloud_event


@functions_framework.cloud_event
def router(cloud_event: CloudEvent) -> None:
    deliver_cloud_event("router", handle, cloud_event)
