"""State the probe functions share with the test, however many times functions-framework loads them."""
FAILING: dict[str, int] = {}  # shard_id → failures left (-1: forever)
HANDLED: list[tuple[str, str]] = []  # (shard_id, cloud) in the order the core saw them


def reset() -> None:
    FAILING.clear()
    HANDLED.clear()
