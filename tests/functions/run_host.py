"""A probe function host as its own process, for crash tests: `python -m tests.functions.run_host
PROVIDER TOPIC FUNCTION` with the fleet config in SKYFUSE_* variables. Runs until killed."""
import sys
import threading
from pathlib import Path

from skyfuse import config
from skyfuse.bus import open_bus
from skyfuse.runtime.clouds.aws import LambdaInvoker
from skyfuse.runtime.clouds.azure import KafkaTriggerInvoker
from skyfuse.runtime.clouds.gcp import CloudEventInvoker
from skyfuse.runtime.host import FunctionHost
from tests.functions import probe


def main(provider: str, topic: str, function: str) -> None:
    fleet = config.load()
    invoker = {
        "aws": lambda: LambdaInvoker("tests.functions.probe:lambda_handler", "skyfuse-probe", "us-east-1", "test"),
        "gcp": lambda: CloudEventInvoker(str(Path(probe.__file__)), "probe"),
        "azure": lambda: KafkaTriggerInvoker(probe.azure_app(topic)),
    }[provider]()
    host = FunctionHost(open_bus(fleet), fleet, provider, function, invoker, topics=[topic])
    print("host running", flush=True)
    host.run(threading.Event())


if __name__ == "__main__":
    main(*sys.argv[1:])
