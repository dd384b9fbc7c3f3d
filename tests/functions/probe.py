"""Entry points for host tests: real Powertools / functions-framework / azure-functions code around a
handler core whose failures the test controls.

The state lives in `probe_state` (see there). With `PROBE_OUT` set (subprocess tests), each
handled event id is appended to that file.
"""
import os
import time

import azure.functions as func
import functions_framework
from aws_lambda_powertools import Logger

from skyfuse.runtime.clouds.aws import process_kafka_batch
from skyfuse.runtime.clouds.azure import deliver_kafka_events
from skyfuse.runtime.clouds.gcp import deliver_cloud_event
from tests.functions.probe_state import FAILING, HANDLED

SLEEP_S = float(os.environ.get("PROBE_SLEEP_S", "0"))
logger = Logger(service="skyfuse-probe")


def handle(event, runtime):
    shard = event.get_data()["shard_id"]
    left = FAILING.get(shard, 0)
    if left:
        FAILING[shard] = left - 1 if left > 0 else left
        raise RuntimeError(f"probe: shard {shard} fails on purpose")
    if SLEEP_S:
        time.sleep(SLEEP_S)
    HANDLED.append((shard, runtime.cloud))
    if os.environ.get("PROBE_OUT"):
        with open(os.environ["PROBE_OUT"], "a") as out:
            out.write(f"{event['id']}\n")
            out.flush()
            os.fsync(out.fileno())


@logger.inject_lambda_context
def lambda_handler(event, context):
    return process_kafka_batch("probe", handle, event, context)


@functions_framework.cloud_event
def probe(cloud_event):
    deliver_cloud_event("probe", handle, cloud_event)


def azure_app(topic: str) -> func.FunctionApp:
    app = func.FunctionApp()

    @app.function_name("probe")
    @app.kafka_trigger(arg_name="batch", topic=topic, broker_list="KafkaBrokerList", consumer_group="probe",
                       cardinality=func.Cardinality.MANY, data_type=func.DataType.STRING)
    def probe_trigger(batch: list[func.KafkaEvent]) -> None:
        deliver_kafka_events("probe", handle, batch)

    return app
