"""Azure Functions entry point of the router: a v2 FunctionApp with one Kafka trigger per topic."""
import azure.functions as func

from services.router.handler import handle
from skyfuse.runtime.clouds.azure import register_kafka_triggers

app = func.FunctionApp()
register_kafka_triggers(app, "router", handle)
