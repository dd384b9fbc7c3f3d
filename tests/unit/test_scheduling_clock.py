"""The scheduler's event clock: event times move it, within bounds no single skewed cloud can
steer (see `skyfuse.scheduling.clock`)."""
import pytest

from skyfuse.scheduling.clock import EventClock, TooOld

T = 1_800_000_000.0


def started(*clouds: str) -> EventClock:
    clock = EventClock(max_lead_s=300, max_lag_s=3600)
    for cloud in clouds:
        clock.accept(cloud, T)
    return clock


def test_samples_move_the_clock_to_their_own_time():
    clock = started("aws", "gcp")
    stamp = clock.accept("aws", T + 60)
    assert (stamp.at, stamp.source, clock.now) == (T + 60, "event", T + 60)


def test_a_late_sample_counts_at_its_own_time_and_never_moves_the_clock_back():
    clock = started("aws", "gcp")
    clock.accept("aws", T + 120)
    stamp = clock.accept("gcp", T + 30)
    assert (stamp.at, stamp.source, clock.now) == (T + 30, "event", T + 120)


def test_a_sample_from_an_hour_in_the_future_is_held_at_the_clock():
    clock = started("aws", "gcp", "azure")
    stamp = clock.accept("gcp", T + 3600)
    assert stamp.at == T and stamp.source == "clock" and clock.now == T
    assert "3600 s after the scheduler's clock" in stamp.note and "2 clouds" in stamp.note
    # the same fast cloud reporting again and again still cannot move it
    for minute in range(1, 30):
        assert clock.accept("gcp", T + 3600 + 60 * minute).at == clock.now
    assert clock.now == T
    # the others keep time as usual
    assert clock.accept("aws", T + 60).at == T + 60 == clock.now


def test_two_clouds_far_ahead_together_jump_the_clock_after_a_silence():
    clock = started("aws", "gcp", "azure")
    clock.accept("aws", T + 7200)  # everyone was silent for two hours
    assert clock.now == T
    stamp = clock.accept("gcp", T + 7230)
    assert clock.now == T + 7200 and stamp.at == T + 7230 and stamp.source == "event"
    assert clock.ahead == {}


def test_a_fleet_with_one_reporting_cloud_follows_it_after_a_silence():
    clock = started("aws")
    assert clock.accept("aws", T + 7200).at == T + 7200 == clock.now


def test_a_sample_older_than_max_lag_is_refused_with_the_figures():
    clock = started("aws")
    with pytest.raises(TooOld, match=r"sampled 3601 s before .* more than 3600 s late are refused"):
        clock.accept("aws", T - 3601)
    assert clock.now == T


def test_other_events_are_decided_at_the_clock_or_at_their_own_time_before_any_sample():
    assert EventClock().stamp(T).at == T and EventClock().stamp(T).source == "event"
    clock = started("aws")
    stamp = clock.stamp(T + 86400)  # a model announced a day "after" the metrics
    assert (stamp.at, stamp.source, stamp.event_time, clock.now) == (T, "clock", T + 86400, T)


def test_the_clock_survives_a_round_trip_through_its_saved_form():
    clock = started("aws", "gcp")
    clock.accept("aws", T + 4000)
    again = EventClock.from_data(clock.to_data())
    assert (again.now, again.clouds, again.ahead) == (clock.now, clock.clouds, clock.ahead)
    again.accept("gcp", T + 4010)
    assert again.now == T + 4000


def test_bounds_must_be_positive():
    with pytest.raises(ValueError, match="must be > 0"):
        EventClock(max_lead_s=0)
