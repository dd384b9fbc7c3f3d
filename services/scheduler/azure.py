"""Azure Functions entry point of the scheduler: a v2 FunctionApp with one Kafka trigger per topic."""
import azure.functions as func

from services.scheduler.handler import handle
from skyfuse.runtime.clouds.azure import register_kafka_triggers

app = func.FunctionApp()
register_kafka_triggers(app, "scheduler", handle)
