"""skyfuse.ml.federated: the server strategies on hand-computed values, their state as bytes and
back, and the refusals of weights that do not fit together."""
import math

import numpy as np
import pytest

from skyfuse.ml import federated as FL

GLOBAL = [np.array([0.0, 1.0], np.float32), np.array([[2.0]], np.float32)]
# two members; the second weighs 3 times the first: mean = [1.5, 1.0], [[2.5]]
MEMBERS = [[np.array([0.0, 1.0], np.float32), np.array([[1.0]], np.float32)],
           [np.array([2.0, 1.0], np.float32), np.array([[3.0]], np.float32)]]
ROWS = [1.0, 3.0]


def _state(strategy: FL.FedAvg) -> dict:
    """A state whose global model is GLOBAL, as after round 0."""
    return {**strategy.start([GLOBAL]), "round": 0}


def test_weighted_mean_and_pseudo_gradient():
    mean = FL.weighted_mean(MEMBERS, ROWS)
    np.testing.assert_allclose(mean[0], [1.5, 1.0])
    np.testing.assert_allclose(mean[1], [[2.5]])
    np.testing.assert_allclose(FL.weighted_mean(MEMBERS)[0], [1.0, 1.0])  # equal weights when none given
    delta = FL.pseudo_gradient(GLOBAL, MEMBERS, ROWS)
    np.testing.assert_allclose(delta[0], [1.5, 0.0])
    np.testing.assert_allclose(delta[1], [[0.5]])


def test_round_zero_is_the_members_mean_for_every_strategy():
    for name in FL.SERVER_STRATEGIES:
        state = FL.strategy(name).start(MEMBERS, ROWS)
        assert state["round"] == 0 and state["strategy"] == name
        np.testing.assert_allclose(state["global"][0], [1.5, 1.0])
        assert state["global"][0].dtype == np.float32  # the members' dtype, as the clients get it


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_step_to_the_weighted_mean(name):
    after = FL.strategy(name).step(_state(FL.strategy(name)), MEMBERS, ROWS)
    assert after["round"] == 1
    np.testing.assert_allclose(after["global"][0], [1.5, 1.0])
    np.testing.assert_allclose(after["global"][1], [[2.5]])


def test_fedadam_one_step_by_hand():
    adam = FL.FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    after = adam.step(_state(adam), MEMBERS, ROWS)
    # delta = [1.5, 0], [[0.5]]; m = 0.1 delta; v = 0.99 tau^2 + 0.01 delta^2 (v starts at tau^2)
    for got, g, d in ((after["global"][0], [0.0, 1.0], [1.5, 0.0]), (after["global"][1].ravel(), [2.0], [0.5])):
        for x, g_i, d_i in zip(got, g, d, strict=True):
            m = 0.1 * d_i
            v = 0.99 * 1e-6 + 0.01 * d_i ** 2
            assert x == pytest.approx(g_i + 0.1 * m / (math.sqrt(v) + 1e-3), rel=1e-6)
    np.testing.assert_allclose(after["m"][0], [0.15, 0.0])
    np.testing.assert_allclose(after["v"][0], [0.99e-6 + 0.0225, 0.99e-6])
    # a parameter the members did not move stays exactly where it was
    assert after["global"][0][1] == np.float32(1.0)


def test_fedyogi_differs_from_fedadam_in_the_second_moment_only():
    adam, yogi = FL.FedAdam(eta=0.1, tau=1e-3), FL.FedYogi(eta=0.1, tau=1e-3)
    a1, y1 = adam.step(_state(adam), MEMBERS, ROWS), yogi.step(_state(yogi), MEMBERS, ROWS)
    np.testing.assert_allclose(a1["m"][0], y1["m"][0])
    # Yogi: v - 0.01 delta^2 sign(v - delta^2) = tau^2 + 0.01 * 2.25 (v < delta^2: v grows)
    assert y1["v"][0][0] == pytest.approx(1e-6 + 0.0225, rel=1e-12)
    assert a1["v"][0][0] == pytest.approx(0.99e-6 + 0.0225, rel=1e-12)
    # a second round with delta = 0.1 below sqrt(v): Adam decays v by b2, Yogi shrinks it additively
    moved = [[g + 0.1 for g in y1["global"]]]
    y2 = yogi.step(y1, moved)
    assert y2["v"][0][0] == pytest.approx(y1["v"][0][0] - 0.01 * 0.1 ** 2, rel=1e-5)
    a2 = adam.step(a1, [[g + 0.1 for g in a1["global"]]])
    assert a2["v"][0][0] == pytest.approx(0.99 * a1["v"][0][0] + 0.01 * 0.1 ** 2, rel=1e-5)


def test_adaptive_steps_are_about_eta_whatever_the_size_of_the_pseudo_gradient():
    """What makes FedAdam differ from FedAvg: a parameter moves about eta a round, not delta."""
    adam = FL.FedAdam(eta=0.01, tau=1e-6)
    for scale in (1e-2, 1.0, 100.0):
        members = [[g + scale for g in GLOBAL]]
        after = adam.step(_state(adam), members)
        step = after["global"][0].astype(np.float64) - GLOBAL[0]
        np.testing.assert_allclose(step, 0.01, rtol=5e-3)


def test_state_round_trips_through_bytes_exactly():
    yogi = FL.FedYogi(eta=0.03)
    state = yogi.step(_state(yogi), MEMBERS, ROWS)
    raw = FL.dumps(state)
    assert FL.dumps(FL.loads(raw)) == raw  # the same state always gives the same bytes
    back = FL.loads(raw)
    assert back["round"] == 1 and back["strategy"] == "fedyogi"
    for key in ("global", "m", "v"):
        for a, b in zip(state[key], back[key], strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    # a retried round steps from the stored state to exactly what the first try wrote
    assert FL.dumps(yogi.step(back, MEMBERS, ROWS)) == FL.dumps(yogi.step(state, MEMBERS, ROWS))


def test_round_states_and_follow():
    strategies = [FL.strategy(n, eta=0.05) for n in FL.AUTO_SERVER]
    first = FL.round_states(strategies, None, MEMBERS, ROWS)
    assert sorted(first) == sorted(FL.AUTO_SERVER)
    second = FL.round_states(strategies, first, [[g + 0.5 for g in MEMBERS[0]]])
    assert not np.array_equal(second["fedavg"]["global"][0], second["fedadam"]["global"][0])
    followed = FL.follow(second, "fedadam")
    for name in FL.AUTO_SERVER:  # every strategy continues from the model the clients get next
        assert all(np.array_equal(a, b)
                   for a, b in zip(followed[name]["global"], second["fedadam"]["global"], strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(followed["fedyogi"]["v"], second["fedyogi"]["v"], strict=True))
    with pytest.raises(FL.FederatedError, match=r"no state of \['fedyogi'\] from the previous round"):
        FL.round_states(strategies, {"fedavg": first["fedavg"], "fedadam": first["fedadam"]}, MEMBERS)


def test_refusals_name_what_is_wrong():
    with pytest.raises(FL.FederatedError, match="member 1: weight 0 has shape"):
        FL.weighted_mean([GLOBAL, [np.zeros(3), GLOBAL[1]]])
    with pytest.raises(FL.FederatedError, match="member 1 has 1 weight arrays"):
        FL.weighted_mean([GLOBAL, GLOBAL[:1]])
    with pytest.raises(FL.FederatedError, match="one finite weight >= 0 per member"):
        FL.weighted_mean(MEMBERS, [1.0, -1.0])
    with pytest.raises(FL.FederatedError, match="'fedavg' state cannot be stepped by fedadam"):
        FL.FedAdam().step(FL.FedAvg().start(MEMBERS), MEMBERS)
    with pytest.raises(FL.FederatedError, match="fedadam: eta must be > 0, got 0; beta_1 must be in"):
        FL.FedAdam(eta=0, beta_1=1.0)
    with pytest.raises(FL.FederatedError, match="unknown server strategy 'fedsgd'; choose one of fedavg"):
        FL.strategy("fedsgd")
    with pytest.raises(FL.FederatedError, match="not a server strategy state"):
        FL.loads(b"{not json")
    assert FL.strategy("fedyogi", eta=0.2, proximal_mu=1.0).params() == {"eta": 0.2, "beta_1": 0.9, "beta_2": 0.99,
                                                                         "tau": 1e-3}


@pytest.mark.parametrize("best_by_round, patience, stop", [
    ([0.9, 0.9], 1, True),            # one round without gain
    ([0.9, 0.95], 1, False),          # the last round improved
    ([0.9, 0.95, 0.95, 0.94], 2, True),
    ([0.9, 0.95, 0.94, 0.96], 2, False),  # a gain inside the window keeps going
    ([0.9, 0.9, 0.9], 3, False),      # not enough rounds to judge
    ([0.9, 0.9, 0.9, 0.9], 0, False),  # 0: every round runs
    ([1.0, 1.0, 1.0, 1.0], 3, True),  # a perfect score cannot be beaten
])
def test_the_server_stops_once_patience_rounds_bring_no_better_score(best_by_round, patience, stop):
    assert FL.plateaued(best_by_round, patience) is stop
