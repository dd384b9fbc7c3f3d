"""Google Cloud entry point of the trainer: functions-framework, target `trainer`, signature cloudevent."""
import functions_framework
from cloudevents.http import CloudEvent

from services.trainer.handler import handle
from skyfuse.runtime.clouds.gcp import deliver_cloud_event


@functions_framework.cloud_event
def trainer(cloud_event: CloudEvent) -> None:
    deliver_cloud_event("trainer", handle, cloud_event)
