"""Server-side federated optimisation: how one round's member weights become the next global model.

numpy only. A model's weights are a list of arrays (every member in the same order and shapes);
a server strategy's state is a plain dict (`round`, `global` weights and, for the adaptive ones,
the moments `m` and `v`) that `dumps`/`loads` turn into deterministic bytes, so the fuser can keep
it in its store under a key of the round that made it:

    state_r = strategy.step(state_{r-1}, members of round r)   (never read-modify-write of one key)

so a retried round recomputes exactly what the first try wrote.

Strategies, as in Flower (`FedAvg`, then subclasses that override only what differs):

- `FedAvg`: the next global model is the members' weighted mean.
- `FedProx` (Li et al., 2020): FedAvg on the server; the difference is on the client, which adds
  mu/2 * ||w - w_global||^2 to its loss while fine-tuning (`ModelSpec.proximal_mu`).
- `FedAdam`, `FedYogi` (Reddi et al., "Adaptive Federated Optimization", 2021): the pseudo-gradient
  delta = weighted mean of the members - global is fed to a server optimiser:
      m = b1 m + (1 - b1) delta
      v = b2 v + (1 - b2) delta^2                       (Adam)
      v = v - (1 - b2) delta^2 sign(v - delta^2)         (Yogi: v moves towards delta^2 additively)
      global = global + eta m / (sqrt(v) + tau),  m starting at 0 and v at tau^2.

Round 0 is a warm start for every strategy: its members were each trained to the end from one
shared seeded initialisation, so the first global model is their weighted mean (`start`); an
adaptive step from the random initialisation would throw that training away. The optimiser steps
from round 1 on, on the pseudo-gradients of the fine-tuning rounds.
"""
from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from skyfuse.errors import InvalidInput

Weights = list[np.ndarray]  # one array per model weight, in a fixed order
State = dict[str, Any]  # a strategy's state: `strategy`, `round`, `global` weights, moments (see the module doc)

ENSEMBLES = ("wavg", "vote", "confidence")  # fused from one round's members; no trajectory of their own
SERVER_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")  # each makes a global model per round
FUSIONS = ("auto",) + ENSEMBLES + SERVER_STRATEGIES  # what a run may ask for (`--fusion`)
# auto: the ensembles, and one trajectory of global models whose server step is chosen each round
# on validation among these (FedProx changes the clients' training, so it runs only when asked)
AUTO_SERVER = ("fedavg", "fedadam", "fedyogi")
AUTO = ENSEMBLES + AUTO_SERVER


class FederatedError(InvalidInput):
    """Member weights or a state that do not fit together; the message says what differs."""


# ------------------------------------------------------------------------------- weight lists


def _as_weights(weights: Sequence[ArrayLike], what: str) -> Weights:
    arrays = [np.asarray(w) for w in weights]
    if not arrays:
        raise FederatedError(f"{what} has no weights")
    return arrays


def _check_like(reference: Weights, other: Weights, what: str) -> None:
    if len(other) != len(reference):
        raise FederatedError(f"{what} has {len(other)} weight arrays, the global model {len(reference)}")
    for i, (a, b) in enumerate(zip(reference, other, strict=True)):
        if a.shape != b.shape:
            raise FederatedError(f"{what}: weight {i} has shape {b.shape}, the global model {a.shape}")


def weighted_mean(members: Sequence[Sequence[ArrayLike]], sample_weights: Sequence[float] | None = None) -> Weights:
    """sum_i w_i members_i with w normalised to sum 1 (equal when None), in float64."""
    models = [_as_weights(m, f"member {i}") for i, m in enumerate(members)]
    if not models:
        raise FederatedError("a server step needs at least one member")
    for i, m in enumerate(models[1:], start=1):
        _check_like(models[0], m, f"member {i}")
    w = np.full(len(models), 1.0 / len(models)) if sample_weights is None else np.asarray(sample_weights, np.float64)
    if w.shape != (len(models),) or not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise FederatedError(f"need one finite weight >= 0 per member, not all 0; got {list(sample_weights or [])}")
    w = w / w.sum()
    return [sum(wi * m[j].astype(np.float64) for wi, m in zip(w, models, strict=True)) for j in range(len(models[0]))]


def pseudo_gradient(global_weights: Sequence[ArrayLike], members: Sequence[Sequence[ArrayLike]],
                    sample_weights: Sequence[float] | None = None) -> Weights:
    """delta = weighted mean of the members - global: the direction the round moved the model."""
    mean = weighted_mean(members, sample_weights)
    base = _as_weights(global_weights, "the global model")
    _check_like(base, mean, "the members")
    return [m - g.astype(np.float64) for m, g in zip(mean, base, strict=True)]


def _like(values: Weights, reference: Weights) -> Weights:
    """Values in the reference's dtypes (the global model keeps the members' float32)."""
    return [np.asarray(v).astype(r.dtype) for v, r in zip(values, reference, strict=True)]


# ---------------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class FedAvg:
    """The next global model is the members' weighted mean."""

    name = "fedavg"

    def start(self, members: Sequence[Sequence[ArrayLike]], sample_weights: Sequence[float] | None = None) -> State:
        """The state after round 0: the warm start, the members' weighted mean."""
        reference = _as_weights(members[0], "member 0") if members else []
        mean = _like(weighted_mean(members, sample_weights), reference)
        return {"strategy": self.name, "round": 0, "global": mean, **self._moments(mean)}

    def step(self, state: State, members: Sequence[Sequence[ArrayLike]],
             sample_weights: Sequence[float] | None = None) -> State:
        """The state after one more round: its `global` is the next global model."""
        self._check_state(state)
        base = _as_weights(state["global"], "the state's global model")
        delta = pseudo_gradient(base, members, sample_weights)
        new_global, moments = self._update(base, delta, state)
        return {"strategy": self.name, "round": int(state["round"]) + 1, "global": _like(new_global, base), **moments}

    def _moments(self, weights: Weights) -> State:
        return {}

    def _update(self, base: Weights, delta: Weights, state: State) -> tuple[Weights, State]:
        return [g.astype(np.float64) + d for g, d in zip(base, delta, strict=True)], {}

    def _check_state(self, state: State) -> None:
        if state.get("strategy") != self.name:
            raise FederatedError(f"a {state.get('strategy')!r} state cannot be stepped by {self.name}")
        for key in ("round", "global"):
            if key not in state:
                raise FederatedError(f"the {self.name} state lacks {key!r}")

    def params(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FedProx(FedAvg):
    """FedAvg on the server; the clients add mu/2 ||w - w_global||^2 to their loss."""

    name = "fedprox"
    proximal_mu: float = 0.01

    def __post_init__(self) -> None:
        if not (np.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise FederatedError(f"proximal_mu must be a finite number >= 0, got {self.proximal_mu}")


@dataclass(frozen=True)
class FedAdam(FedAvg):
    """Adam on the pseudo-gradient, as a server optimiser."""

    name = "fedadam"
    eta: float = 0.01  # server learning rate
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3  # adaptivity: how small sqrt(v) may get before the step stops growing

    def __post_init__(self) -> None:
        problems = [f"eta must be > 0, got {self.eta}"] if not self.eta > 0 else []
        problems += [f"{k} must be in [0, 1), got {v}" for k, v in (("beta_1", self.beta_1), ("beta_2", self.beta_2))
                     if not 0 <= v < 1]
        problems += [f"tau must be > 0, got {self.tau}"] if not self.tau > 0 else []
        if problems:
            raise FederatedError(f"{self.name}: " + "; ".join(problems))

    def _moments(self, weights: Weights) -> State:
        return {"m": [np.zeros(w.shape) for w in weights], "v": [np.full(w.shape, self.tau ** 2) for w in weights]}

    def _update(self, base: Weights, delta: Weights, state: State) -> tuple[Weights, State]:
        for key in ("m", "v"):
            if key not in state:
                raise FederatedError(f"the {self.name} state lacks {key!r}")
            _check_like(base, [np.asarray(x) for x in state[key]], f"the state's {key!r}")
        # every list is as long as `base`: the moments were checked above, delta is of base
        m = [self.beta_1 * np.asarray(mi, np.float64) + (1 - self.beta_1) * d
             for mi, d in zip(state["m"], delta, strict=True)]
        v = [self._second_moment(np.asarray(vi, np.float64), d) for vi, d in zip(state["v"], delta, strict=True)]
        new = [g.astype(np.float64) + self.eta * mi / (np.sqrt(vi) + self.tau)
               for g, mi, vi in zip(base, m, v, strict=True)]
        return new, {"m": m, "v": v}

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        moment: np.ndarray = self.beta_2 * v + (1 - self.beta_2) * delta * delta
        return moment


@dataclass(frozen=True)
class FedYogi(FedAdam):
    """Yogi's additive second moment: v changes by at most (1 - b2) delta^2 a round."""

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        d2 = delta * delta
        moment: np.ndarray = v - (1 - self.beta_2) * d2 * np.sign(v - d2)
        return moment


def round_states(strategies: Sequence[FedAvg], previous: dict[str, State] | None,
                 members: Sequence[Sequence[ArrayLike]], sample_weights: Sequence[float] | None = None
                 ) -> dict[str, State]:
    """Each strategy's state after this round: its warm start (round 0, `previous` None) or its
    step from its state after the previous round."""
    if previous is None:
        return {s.name: s.start(members, sample_weights) for s in strategies}
    missing = [s.name for s in strategies if s.name not in previous]
    if missing:
        raise FederatedError(f"no state of {missing} from the previous round (it had {sorted(previous)})")
    return {s.name: s.step(previous[s.name], members, sample_weights) for s in strategies}


def follow(states: dict[str, State], chosen: str) -> dict[str, State]:
    """The states continuing from the chosen strategy's global model: the clients fine-tune that
    one next round, so every strategy's next pseudo-gradient is taken against it (its moments
    are kept). With one strategy this changes nothing."""
    if chosen not in states:
        raise FederatedError(f"cannot follow {chosen!r}: the states are of {sorted(states)}")
    return {name: {**state, "global": list(states[chosen]["global"])} for name, state in states.items()}


def plateaued(best_by_round: Sequence[float], patience: int) -> bool:
    """Whether the last `patience` rounds' best validation scores beat none of the rounds before
    them: the server's early stop (never with `patience` 0, or before `patience` + 1 rounds)."""
    if patience < 1 or len(best_by_round) <= patience:
        return False
    return max(best_by_round[-patience:]) <= max(best_by_round[:-patience])


def strategy(name: str, **params: Any) -> FedAvg:
    """The server strategy called `name`, with its hyper-parameters (others are ignored)."""
    kinds = {k.name: k for k in (FedAvg, FedProx, FedAdam, FedYogi)}
    if name not in kinds:
        raise FederatedError(f"unknown server strategy {name!r}; choose one of {', '.join(kinds)}")
    kind = kinds[name]
    known = {f for f in kind.__dataclass_fields__}
    return kind(**{k: v for k, v in params.items() if k in known})


# ------------------------------------------------------------------------------ serialisation


def _encode(value: Any) -> Any:  # a state's value: arrays, lists, dicts, scalars
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value)
        return {"dtype": data.dtype.str, "shape": list(data.shape), "b64": base64.b64encode(data.tobytes()).decode()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(value: Any) -> Any:  # JSON `_encode` made
    if isinstance(value, dict) and set(value) == {"dtype", "shape", "b64"}:
        data = np.frombuffer(base64.b64decode(value["b64"]), dtype=np.dtype(value["dtype"]))
        return data.reshape(value["shape"]).copy()
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


def dumps(state: State) -> bytes:
    """The state as JSON bytes (arrays exactly, as base64 of their bytes): the same state always
    gives the same bytes."""
    return json.dumps(_encode(state), sort_keys=True, separators=(",", ":")).encode()


def loads(raw: bytes) -> State:
    """The state `dumps` wrote, arrays with their dtypes and shapes."""
    try:
        state: State = _decode(json.loads(raw))
        return state
    except (ValueError, TypeError, KeyError) as exc:
        raise FederatedError(f"not a server strategy state: {exc}") from None
