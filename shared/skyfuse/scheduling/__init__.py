"""Placement policy for serving: score every cloud as cost + λ·performance and move serving
with hysteresis. A pure library: no I/O (except `simulate.load_trace`/`write_trace`), no bus and
no clock; time is passed in.

- `metrics`: smoothing of `metrics.sampled` data per cloud, staleness.
- `clock`: `EventClock`, the decision time from the events' own times, bounded against skewed clocks.
- `policy`: `PolicyConfig`, `Policy.decide(state, now) -> Decision | None`, baselines.
- `replay`: deterministic replay of a metrics trace, comparison with recorded decisions.
- `simulate`: a synthetic day, the closed-loop simulator, the comparison table.
"""
from skyfuse.scheduling.clock import EventClock, TooOld
from skyfuse.scheduling.metrics import MetricsState, Sample, SampleError, format_time, parse_time
from skyfuse.scheduling.policy import (
                                       CloudSpec,
                                       Decision,
                                       Placement,
                                       Policy,
                                       PolicyConfig,
                                       Score,
                                       State,
                                       StaticPolicy,
                                       greedy,
)
from skyfuse.scheduling.replay import differences, replay

__all__ = ["CloudSpec", "Decision", "EventClock", "MetricsState", "Placement", "Policy", "PolicyConfig", "Sample",
           "SampleError", "Score", "State", "StaticPolicy", "TooOld", "differences", "format_time", "greedy",
           "parse_time", "replay"]
