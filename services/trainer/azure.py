"""Azure Functions entry point of the trainer: a v2 FunctionApp with one Kafka trigger per topic."""
import azure.functions as func

from services.trainer.handler import handle
from skyfuse.runtime.clouds.azure import register_kafka_triggers

app = func.FunctionApp()
register_kafka_triggers(app, "trainer", handle)
