"""Google Cloud entry point of the exporter: functions-framework, target `exporter`, signature cloudevent."""
import functions_framework
from cloudevents.http import CloudEvent

from services.exporter.handler import handle
from skyfuse.runtime.clouds.gcp import deliver_cloud_event


@functions_framework.cloud_event
def exporter(cloud_event: CloudEvent) -> None:
    deliver_cloud_event("exporter", handle, cloud_event)
