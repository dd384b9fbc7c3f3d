"""AWS Lambda entry point of the trainer: a Kafka event source mapping delivers batches of records."""
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.typing import LambdaContext

from services.trainer.handler import handle
from skyfuse.runtime.clouds.aws import process_kafka_batch

logger = Logger(service="skyfuse-trainer")


@logger.inject_lambda_context
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return process_kafka_batch("trainer", handle, event, context)
