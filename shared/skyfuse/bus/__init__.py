"""The event bus: one interface (`base.Bus`), an embedded backend and a Kafka backend."""
from __future__ import annotations

from pathlib import Path

from skyfuse.bus.base import Bus, Consumer, Record, TopicPartition, partition_for
from skyfuse.config import Fleet

__all__ = ["Bus", "Consumer", "Record", "TopicPartition", "partition_for", "open_bus"]


def open_bus(fleet: Fleet) -> Bus:
    """The backend the fleet config names."""
    settings = fleet.bus
    if settings.backend == "kafka":
        from skyfuse.bus.kafka import KafkaBus, security_options

        k = settings.kafka
        return KafkaBus(k.bootstrap_servers, client_id=k.client_id, session_timeout_ms=k.session_timeout_ms,
                        request_timeout_ms=k.request_timeout_ms, default_partitions=settings.partitions,
                        security=security_options(k))
    from skyfuse.bus.embedded import EmbeddedBus

    return EmbeddedBus(Path(settings.embedded.path), default_partitions=settings.partitions,
                       retention_ms=int(settings.embedded.retention_hours * 3_600_000))
