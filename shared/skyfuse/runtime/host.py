"""The local function host: plays a cloud's Kafka trigger for one function.

It consumes the function's topics in the group `<cloud>.<function>`, gathers batches within the
cloud's limits, calls the real entry point with the cloud's native event, and commits, per
partition, only the contiguous prefix of records that succeeded or were dead-lettered (while busy,
at most every `commit_interval_s`; idle, at once). Failures are retried with exponential backoff
and jitter up to `max_attempts` or `max_record_age_s`, then written to `<function>.dlq` with the
original record and the reason; malformed records go there at once. At-least-once delivery;
handlers are idempotent.

Each record is decoded and checked once, here, as it arrives; the entry point decodes it again, as
in the cloud, and finds it among the records the host says it checked (`events.checked`), so the
checks are not repeated.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from skyfuse import contracts, events
from skyfuse.bus.base import Bus, Consumer, Record, TopicPartition
from skyfuse.config import Fleet
from skyfuse.config import Function as FunctionSettings
from skyfuse.runtime import deadletter
from skyfuse.runtime.clouds.base import Invoker, Outcome
from skyfuse.runtime.function import Runtime, hosted
from skyfuse.runtime.tracker import Backoff, Lane, Pending, Tracker

if TYPE_CHECKING:
    from cloudevents.http import CloudEvent

    from skyfuse.runtime.metrics import HostMetrics

log = logging.getLogger("skyfuse.host")


# "rejected": dead-lettered by the function itself; "dead-lettered": by the host, after its retries
DeliveryResult = Literal["ok", "rejected", "retry", "dead-lettered"]


@dataclass(frozen=True)
class Delivery:
    """One record's fate in one invocation, for logs and the CLI."""

    cloud: str
    function: str
    shape: str
    record: Record
    event_type: str
    event_id: str
    result: DeliveryResult
    attempts: int
    reason: str = ""


Listener = Callable[[Delivery], None]


def _nobody(delivery: Delivery) -> None:
    """The listener of a host that was given none."""


class FunctionHost:
    def __init__(self, bus: Bus, fleet: Fleet, cloud: str, function: str, invoker: Invoker,
                 listener: Listener | None = None, topics: list[str] | None = None,
                 settings: FunctionSettings | None = None, metrics: HostMetrics | None = None):
        self.bus, self.fleet, self.cloud, self.function, self.invoker = bus, fleet, cloud, function, invoker
        self.group = f"{cloud}.{function}"
        self.topics = topics or contracts.topics_for(function)
        self.dlq = contracts.dlq_topic(function)
        settings = settings or fleet.function(function)
        self.delivery = fleet.delivery
        self.concurrency = settings.concurrency
        self.tracker = Tracker(settings.ordering)
        self.backoff = Backoff(self.delivery.backoff_initial_s, self.delivery.backoff_max_s)
        self.runtime = Runtime(cloud, function, fleet, bus_factory=lambda: bus, settings=settings)
        self.listener = listener or _nobody
        self.metrics = metrics
        # the trigger's batching window, as this function's settings set it
        self.limits = replace(invoker.limits, max_wait_s=settings.batch_window(function, invoker.limits.max_wait_s))
        self.max_buffer = max(100, 4 * self.limits.max_records * self.concurrency)
        self._pool = (ThreadPoolExecutor(self.concurrency, thread_name_prefix=self.group) if self.concurrency > 1
                      else None)
        self.consumer: Consumer | None = None  # set once `run` has joined the group
        self._delivered = False  # the last step ran batches
        self._commit_due = 0.0  # monotonic time from which a busy host commits again

    # -- the loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.bus.ensure_topics([*self.topics, self.dlq])
                self.consumer = self.bus.consumer(self.group, self.topics, on_revoke=self._revoked)
                break
            except Exception:
                log.exception("cannot join the bus yet; retrying in 1 s", extra={"group": self.group})
                stop.wait(1.0)
        if self.consumer is None:
            return
        with self.consumer:
            while not stop.is_set():
                try:
                    self.step()
                except Exception:  # the bus hiccuped: keep every record pending and try again
                    log.exception("host step failed; retrying in 1 s", extra={"group": self.group})
                    stop.wait(1.0)
            self._commit()

    def step(self) -> None:
        room = self.max_buffer - len(self.tracker)
        # Right after a delivery, take only what has already arrived: the records still buffered
        # may fill the next batch now, and a poll that waits for more would hold them back.
        timeout = 0.0 if self._delivered else self._idle_timeout()
        if room > 0:
            assert self.consumer is not None, "a host steps only after `run` has joined the group"
            for record in self.consumer.poll(timeout, room):
                self._accept(record)
        elif timeout:
            time.sleep(timeout)
        for pending in self.tracker.invalid():
            assert pending.invalid is not None  # what `invalid()` gives: records that have a reason
            self._dead_letter(pending, pending.invalid)
        batches = self._batches(time.monotonic())
        if batches:
            runs = self._pool.map(self._invoke, batches) if self._pool else map(self._invoke, batches)
            for batch, outcome in zip(batches, list(runs), strict=True):  # one outcome per batch
                self._settle(batch, outcome)
        self._delivered = bool(batches)
        if not batches or time.monotonic() >= self._commit_due:  # busy, a commit at most every commit_interval_s
            self._commit()
        else:
            self.tracker.forget_finished()  # what is done takes no room in the buffer while the commit waits

    def _idle_timeout(self) -> float:
        """Wait for new records no longer than until the next retry or batch window is due."""
        timeout = self.delivery.poll_timeout_s
        due = self.tracker.next_due()
        if due is not None:
            timeout = min(timeout, max(0.0, due - time.monotonic()))
        if len(self.tracker):
            timeout = min(timeout, self.limits.max_wait_s / 4 or 0.01)
        return timeout

    # -- records in ---------------------------------------------------------------------------
    def _accept(self, record: Record) -> None:
        pending = Pending(record, arrived=time.monotonic())
        try:
            pending.event = events.decode(record.key, record.value, record.headers)
        except events.MalformedEvent as exc:
            pending.invalid = str(exc)
        pending.cost = size = self.invoker.cost(record)  # once: the batching below reads it every step
        limit = self.limits.max_bytes
        if pending.invalid is None and size > limit:
            pending.invalid = (f"record of {size} bytes exceeds the {limit // (1024 * 1024)} MB payload limit of a "
                               f"{self.invoker.shape}; store large data in the cloud's store and send its URI")
        self.tracker.add(pending)

    def _batches(self, now: float) -> list[list[Pending]]:
        lanes = self.tracker.ready(now)
        if not lanes:
            return []
        limits = self.limits
        waiting = sum(len(queue) for queue in lanes)
        retrying = any(queue[0].attempts for queue in lanes)
        oldest = min(queue[0].arrived for queue in lanes)
        if not retrying and waiting < limits.max_records * self.concurrency and now - oldest < limits.max_wait_s:
            return []  # the batching window is still open
        batches: list[list[Pending]] = [[] for _ in range(self.concurrency)]
        sizes = [0] * self.concurrency
        for i, queue in enumerate(lanes):
            slot = i % self.concurrency
            for pending in queue:
                cost = pending.cost
                if len(batches[slot]) >= limits.max_records or sizes[slot] + cost > limits.max_bytes:
                    break
                if pending.invalid is not None:
                    break  # a malformed record is dead-lettered in turn, not delivered
                batches[slot].append(pending)
                sizes[slot] += cost
                pending.in_flight = True
        return [batch for batch in batches if batch]

    # -- invoking ---------------------------------------------------------------------------
    def _invoke(self, batch: list[Pending]) -> Outcome:
        # The entry point decodes each record again, as in the cloud; these passed every check in `_accept`.
        with hosted(self.runtime), events.checked((p.record.key, p.record.value, p.record.headers) for p in batch):
            started = time.monotonic()
            self._forget_refusals(batch)
            try:
                outcome = self.invoker.invoke(_native(batch))
            except Exception as exc:  # the adapter itself broke: treat as a failed invocation
                outcome = Outcome.all_failed(len(batch), f"{type(exc).__name__}: {exc}")
            if self.metrics:
                self.metrics.invocation.labels(self.cloud, self.function).observe(time.monotonic() - started)
            if outcome.whole and len(batch) > 1:
                return self._isolate(batch)
            return outcome

    def _isolate(self, batch: list[Pending]) -> Outcome:
        """After a whole-batch failure, try lane by lane, one record at a time, to find the culprit."""
        outcome, stopped = Outcome(), set[Lane]()
        for i, pending in enumerate(batch):
            lane = self.tracker.lane(pending)
            if lane in stopped:
                outcome.failed[i] = "not tried: an earlier record of its lane failed"
                continue
            self._forget_refusals([pending])  # what the failed whole-batch run noted is void
            try:
                single = self.invoker.invoke(_native([pending]))
            except Exception as exc:  # the adapter broke on this record: it failed, the rest go on
                single = Outcome.all_failed(1, f"{type(exc).__name__}: {exc}")
            if single.failed:
                outcome.failed[i] = single.failed[0]
                stopped.add(lane)
        return outcome

    def _settle(self, batch: list[Pending], outcome: Outcome) -> None:
        """Apply an outcome lane by lane: finish up to the first failure, retry or dead-letter it,
        and leave the rest of its lane to go again after it."""
        now, blocked = time.monotonic(), set[Lane]()
        for pending in batch:  # first, so that nothing below can leave a record in flight for good
            pending.in_flight = False
        for i, pending in enumerate(batch):
            lane = self.tracker.lane(pending)
            if lane in blocked or i in outcome.untried:
                continue
            if i not in outcome.failed:
                self.tracker.finish(pending)
                refusal = self._refusal(pending)
                self._tell(pending, "ok" if refusal is None else "rejected", refusal or "")
                continue
            blocked.add(lane)
            if i in outcome.permanent:
                pending.attempts += 1
                self._dead_letter(pending, f"{outcome.failed[i]} (permanent: not retried)")
            else:
                self._fail(pending, outcome.failed[i], now)

    def _forget_refusals(self, batch: list[Pending]) -> None:
        for pending in batch:
            if pending.event is not None:
                self.runtime.rejected.pop(pending.event["id"], None)

    def _refusal(self, pending: Pending) -> str | None:
        """Why the function dead-lettered this record itself, if it did."""
        if pending.event is None:
            return None
        event_id: str = pending.event["id"]
        reasons = self.runtime.rejected.get(event_id)
        if not reasons:
            return None
        reason = reasons.pop(0)
        if not reasons:
            del self.runtime.rejected[event_id]
        return reason

    def _fail(self, pending: Pending, reason: str, now: float) -> None:
        waiting = self.runtime.claimed_elsewhere.pop(pending.event["id"], None) if pending.event is not None else None
        if waiting is not None:  # another instance holds its idempotency claim: wait, spend no attempt
            pending.not_before = now + min(waiting, self.backoff.max_s)
            self._tell(pending, "retry", reason)
            return
        pending.attempts += 1
        pending.last_error = reason
        if pending.first_failed is None:
            pending.first_failed = now
        age = now - pending.first_failed  # since its first failure: a backlog is not dead on arrival
        if pending.attempts >= self.delivery.max_attempts:
            self._dead_letter(pending, f"{reason} (gave up after {pending.attempts} attempts)")
        elif age >= self.delivery.max_record_age_s:
            self._dead_letter(pending, f"{reason} (failing for {age:.0f} s, over max_record_age_s="
                                       f"{self.delivery.max_record_age_s:g})")
        else:
            pending.not_before = now + self.backoff.delay(pending.attempts)
            self._tell(pending, "retry", reason)

    def _dead_letter(self, pending: Pending, reason: str) -> None:
        r = pending.record
        try:
            deadletter.write(self.bus, self.function, self.cloud, r.key, r.value, r.headers, reason,
                             topic=r.topic, partition=r.partition, offset=r.offset, attempts=pending.attempts)
        except Exception as exc:  # the bus is down: the record stays, and is tried again later
            pending.not_before = time.monotonic() + self.backoff.delay(max(1, pending.attempts))
            log.warning("dead letter not written (%s: %s); record kept", type(exc).__name__, exc,
                        extra={"group": self.group, "record": f"{r.tp}@{r.offset}"})
            return
        self.tracker.finish(pending)
        self._tell(pending, "dead-lettered", reason)

    def _tell(self, pending: Pending, result: DeliveryResult, reason: str = "") -> None:
        if self.metrics:
            self.metrics.delivered(self.cloud, self.function, result)
        level = logging.INFO if result == "ok" else logging.WARNING
        logged = log.isEnabledFor(level)
        if not logged and self.listener is _nobody:
            return  # nobody takes the rest
        event = pending.event
        delivery = Delivery(
            self.cloud, self.function, self.invoker.shape, pending.record,
            event["type"].removeprefix(contracts.TYPE_PREFIX) if event is not None else "?",
            event["id"] if event is not None else "?", result, pending.attempts, reason,
        )
        if logged:
            log.log(level, f"{result}: {delivery.event_type} to {self.group}", extra={
                "cloud": self.cloud, "function": self.function, "event_id": delivery.event_id,
                "event_type": delivery.event_type, "record": f"{pending.record.tp}@{pending.record.offset}",
                "attempts": pending.attempts, "reason": reason,
                "trace_id": events.EventInfo.of(event).trace_id if event is not None else None,
            })
        try:
            self.listener(delivery)
        except Exception:  # an observer's bug must not stall deliveries
            log.exception("delivery listener failed", extra={"group": self.group})

    # -- commits ------------------------------------------------------------------------------
    def _commit(self) -> None:
        moved = self.tracker.commit_positions()
        if moved and self.consumer is not None:
            self.consumer.commit(moved)  # raises when the bus refuses: the same positions go again
            self.tracker.committed_to(moved)
        self._commit_due = time.monotonic() + self.delivery.commit_interval_s

    def _revoked(self, partitions: list[TopicPartition]) -> None:
        self._commit()
        self.tracker.drop(partitions)


def _native(batch: list[Pending]) -> list[tuple[Record, CloudEvent]]:
    """A batch as an invoker takes it: record and event. Only decoded records are ever batched (a
    record that could not be decoded is `invalid`, and `_batches` stops before it)."""
    out = []
    for pending in batch:
        assert pending.event is not None, "an undecoded record was batched"
        out.append((pending.record, pending.event))
    return out
