"""Google Cloud entry point of the deployer: functions-framework, target `deployer`, signature cloudevent."""
import functions_framework
from cloudevents.http import CloudEvent

from services.deployer.handler import handle
from skyfuse.runtime.clouds.gcp import deliver_cloud_event


@functions_framework.cloud_event
def deployer(cloud_event: CloudEvent) -> None:
    deliver_cloud_event("deployer", handle, cloud_event)
