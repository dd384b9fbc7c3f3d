"""The scheduler's time: the events' own times, bounded so one skewed clock cannot steer it.

Pure: no I/O and no wall clock. Every placement decision is taken at `EventClock.now`, which only
the `sampled_at` of `metrics.sampled` moves, so a backlog replayed after a restart gives the same
decisions it gave live, and the clock of the machine the scheduler runs on never matters.

For a sample at time `t` from cloud `c` (`accept`):

- `t` at most `max_lead_s` ahead of `now`: `now` moves to `t` (the normal case: clouds report
  every few seconds to a minute).
- `t` further ahead: a fast clock, or the first sample after every cloud was silent. `now` jumps
  only when `quorum` distinct clouds (2, or 1 while a single cloud has ever reported) have sent
  times that far ahead, and then to the earliest of their latest such times. Until then the sample
  counts as taken at `now`: one fast clock can neither fast-forward the dwell timers nor keep its
  cloud looking alive after it stops reporting.
- `t` at most `max_lag_s` behind `now`: counted at its own time (a late sample, already faded by
  its age; it never moves `now` back).
- `t` further behind: refused (`TooOld`); at the default half-life its weight would be nil, and
  its cloud's clock is too slow to trust.

Other events (`fused.ready`) never move the clock: they are decided at `now`, or at their own
time while no sample has been seen yet.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from skyfuse.errors import InvalidInput
from skyfuse.scheduling.metrics import format_time


class TooOld(InvalidInput):
    """A sample further behind the clock than `max_lag_s`."""


@dataclass(frozen=True)
class Stamp:
    """The time an event counts at, and why: `source` is "event" (its own time) or "clock"
    (held at the scheduler's clock; `note` says why)."""

    at: float
    event_time: float
    source: str
    note: str = ""

    def to_data(self) -> dict[str, Any]:
        data = {"source": self.source, "event_time": format_time(self.event_time)}
        if self.note:
            data["note"] = self.note
        return data


@dataclass
class EventClock:
    max_lead_s: float = 300.0
    max_lag_s: float = 3600.0
    now: float | None = None
    clouds: set[str] = field(default_factory=set)  # clouds that have reported
    ahead: dict[str, float] = field(default_factory=dict)  # cloud → latest time beyond now + max_lead_s

    def __post_init__(self) -> None:
        if not self.max_lead_s > 0 or not self.max_lag_s > 0:
            raise ValueError("max_lead_s and max_lag_s must be > 0")

    def accept(self, cloud: str, t: float) -> Stamp:
        """The time a sample from `cloud` dated `t` counts at; moves `now` (see the module doc).
        Raises `TooOld` for a sample further behind `now` than `max_lag_s`."""
        self.clouds.add(cloud)
        if self.now is None or self.now <= t <= self.now + self.max_lead_s:
            self._move(t)
            return Stamp(t, t, "event")
        if t < self.now:
            if self.now - t > self.max_lag_s:
                raise TooOld(f"sampled {self.now - t:.0f} s before the scheduler's clock "
                             f"({format_time(self.now)}); samples more than {self.max_lag_s:.0f} s late are refused")
            return Stamp(t, t, "event")
        self.ahead[cloud] = t
        quorum = min(2, len(self.clouds))
        if len(self.ahead) >= quorum:
            agreeing = sorted(self.ahead)
            self._move(min(self.ahead.values()))
            if t <= self.now + self.max_lead_s:
                return Stamp(t, t, "event",
                             f"the clock jumped ahead: {', '.join(agreeing)} reported times that far ahead")
        return Stamp(self.now, t, "clock",
                     f"sampled {t - self.now:.0f} s after the scheduler's clock, more than {self.max_lead_s:.0f} s: "
                     f"counted at the clock until {quorum} clouds report times that far ahead")

    def stamp(self, t: float) -> Stamp:
        """The time a non-sample event dated `t` is decided at (it does not move the clock)."""
        if self.now is None:
            return Stamp(t, t, "event", "no metrics yet: the event's own time")
        return Stamp(self.now, t, "clock", "the latest metrics time")

    def _move(self, t: float) -> None:
        if self.now is None or t > self.now:
            self.now = t
        self.ahead = {c: a for c, a in self.ahead.items() if a > self.now + self.max_lead_s}

    def to_data(self) -> dict[str, Any]:
        return {"now": self.now, "clouds": sorted(self.clouds), "ahead": dict(self.ahead)}

    @classmethod
    def from_data(cls, data: Mapping[str, Any] | None, max_lead_s: float = 300.0,
                  max_lag_s: float = 3600.0) -> EventClock:
        data = data or {}
        return cls(max_lead_s, max_lag_s, data.get("now"), set(data.get("clouds", ())), dict(data.get("ahead", {})))
