"""AWS Lambda entry point of the router: a Kafka event source mapping delivers batches of records."""
from aws_lambda_powertools import Logger

from services.router.handler import handle
from skyfuse.runtime.clouds.aws import process_kafka_batch

logger = Logger(service="skyfuse-router")


@logger.inject_lambda_context
def lambda_handler(event, context):
    return process_kafka_batch("router", handle, event, context)
