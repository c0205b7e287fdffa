"""Client-level differential privacy for partial-model FedAvg (DP-FedAvg), with an accountant.

The mechanism, one round (McMahan et al. 2018, "Learning differentially private recurrent
language models", fixed-denominator estimator, extended to masks):

1. ``clip_updates``: each client's masked delta ``m·d`` is scaled to L2 norm ≤ C over *all*
   the coordinates it holds (one norm per client, across every leaf).
2. ``noisy_holder_average``: the server sums ``Σ_i m_i·d_i`` over the round's clients, adds
   N(0, (σC)²) once to every coordinate some capacity level can hold, and divides by a fixed,
   public ``divisor`` (``expected_holders``: q × the nominal number of clients whose level
   holds the coordinate). The server then applies ``w ← w − η·avg`` as usual.

Why a fixed divisor and noise on every holdable coordinate: adding or removing one client
changes the sum by at most C in L2 norm, so σC noise on the sum is the Gaussian mechanism with
noise multiplier σ, and dividing by a public constant is post-processing. The *realised*
holder count (or skipping noise where no sampled client holds a coordinate) would instead
reveal who was sampled — e.g. a coordinate held only by one client's level would come out
exactly 0 without noise whenever that client is absent — which voids the amplification by
subsampling the accountant relies on. So only coordinates that *no level* holds (divisor 0,
fixed by the public masks, whoever is sampled) are left noise-free and unchanged; they never
carry any client's data. The estimate is unbiased for the mean over the population's holders.

Threat model. Protected: whether a client took part, and everything in its data, against
anyone who sees only the released aggregates / global models (other clients, the final model's
users). ε comes from ``epsilon_after``: Poisson sampling of clients at rate q each round,
Gaussian noise multiplier σ, composed over the rounds (add/remove-one-client adjacency).
Assumed public: capacity levels and every level's mask (for FIARSE a function of the public,
already noised global model; for random masks such as Federated Dropout, the keep
probabilities feed ``expected_holders``). Not protected: the server sees each client's update
(no secure aggregation, no local DP); the per-client norms ``clip_updates`` returns, client
losses and local-test metrics are not privatised and must not be released. The engine's
fixed-size uniform sampling is not Poisson sampling; with it, q = m/N makes ε an estimate.

Accountant: ``epsilon_after`` / ``calibrate_noise`` use Google's ``dp_accounting`` (imported on
use, so this module imports without it). A run whose σ changed part-way (recalibrated for a new
``num_rounds`` on resume) spent its rounds in segments ``(num_rounds_i, σ_i)``:
``epsilon_for_history`` composes them (the latest σ over every round would under-report ε), and
``calibrate_remaining`` picks the σ for the rounds left so that the whole run meets the target.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fiarse_jax.core.server import held, holder_sums


@dataclasses.dataclass(frozen=True)
class DPOptions:
    """DP-FedAvg (``config.dp``; defaults: configs/default.py's, no DP).

    Attributes:
      noise_multiplier: σ (0: no noise), unless ``target_epsilon`` > 0 calibrates it.
      target_epsilon: > 0: σ such that the run's rounds spend this ε (``calibrate_noise``).
      clip_norm: C, each client's update clipped to this L2 norm.
      delta: δ of (ε, δ)-DP.
      accountant: ``rdp`` or ``pld``.
    """

    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    clip_norm: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"

Params = Any
ACCOUNTANTS = ("rdp", "pld")
#: ``(num_rounds, noise_multiplier)``: rounds run at one σ (``epsilon_for_history``).
Segment = tuple[int, float]


def _check(name: str, value: Any, *, low: float, high: float = math.inf,
           low_open: bool = False, high_open: bool = True) -> None:
    """ValueError naming ``value`` unless it is a finite number in the interval; tracers pass."""
    if isinstance(value, jax.core.Tracer):
        return
    v = float(value)
    ok = (math.isfinite(v) and (v > low if low_open else v >= low)
          and (v < high if high_open else v <= high))
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def clip_updates(deltas: Params, masks: Params, clip_norm: float) -> tuple[Params, jax.Array]:
    """Each client's masked delta scaled to L2 norm ≤ ``clip_norm``; also the norms before.

    The norm of client i is taken over the coordinates it holds, across all leaves.
    Updates already within the bound are unchanged.

    Args:
      deltas: client deltas, pytree like params, leading client axis.
      masks: 0/1 pytree like ``deltas``.
      clip_norm: C > 0.

    Returns:
      ``(clipped, norms)``: ``clipped`` like ``deltas`` (their dtypes), 0 on the
      coordinates a client does not hold, whatever the delta holds there (even NaN);
      ``norms`` float32 [n_clients], before clipping: diagnostics, not private.

    Raises:
      ValueError: ``clip_norm`` not a finite number > 0.
    """
    _check("clip_norm", clip_norm, low=0.0, low_open=True)
    kept = jax.tree_util.tree_map(held, deltas, masks)   # NaN outside a mask: dropped
    sq = [jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1) for x in jax.tree_util.tree_leaves(kept)]
    norms = jnp.sqrt(sum(sq))
    factor = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-30))

    def scale(x, d):
        return (x * factor.reshape((-1,) + (1,) * (x.ndim - 1))).astype(d.dtype)

    return jax.tree_util.tree_map(scale, kept, deltas), norms


def expected_holders(level_masks: Params, clients_per_level: Sequence[int],
                     sampling_rate: float) -> Params:
    """Fixed divisor per coordinate: q · Σ_L n_L · m_L (expected sampled holders).

    Args:
      level_masks: pytree like params with a leading level axis: one 0/1 mask per
        capacity level, or keep probabilities for random masks.
      clients_per_level: the nominal (public) client count per level, each ≥ 1 so
        that every coordinate a client could hold gets noise.
      sampling_rate: q, in (0, 1].

    Returns:
      float32 pytree like params (no level axis), the ``divisor`` for
      ``noisy_holder_average``.

    Raises:
      ValueError: a bad ``sampling_rate``, a count < 1, or a level count that does
        not match ``level_masks``.
    """
    _check("sampling_rate", sampling_rate, low=0.0, high=1.0, low_open=True, high_open=False)
    counts = [int(n) for n in clients_per_level]
    if not counts or min(counts) < 1:
        raise ValueError(f"clients_per_level must be positive counts, got {clients_per_level!r}")
    n = jnp.asarray(counts, jnp.float32)

    def expect(m):
        if m.shape[0] != len(counts):
            raise ValueError(f"level_masks has {m.shape[0]} levels but clients_per_level "
                             f"{clients_per_level!r} has {len(counts)}")
        return sampling_rate * jnp.tensordot(n, _f32(m), axes=1)

    return jax.tree_util.tree_map(expect, level_masks)


def noisy_holder_average(clipped: Params, masks: Params, key: jax.Array, *,
                         noise_multiplier: float, clip_norm: float,
                         divisor: Params | float) -> Params:
    """(Σ_i m_i·d_i + N(0, (σC)²)) / divisor per coordinate; 0 and noise-free where divisor = 0.

    Jit-able.

    Args:
      clipped: ``clip_updates`` output, pytree like params with a leading client
        axis (any number of clients, including a Poisson-sampled cohort).
      masks: 0/1 pytree like ``clipped``.
      key: PRNG key for the noise.
      noise_multiplier: σ ≥ 0.
      clip_norm: C > 0, the bound ``clipped`` was clipped to.
      divisor: fixed and public — ``expected_holders``, or a scalar such as the
        expected cohort size q·N for every coordinate. Never the realised holder
        count (see the module docstring).

    Returns:
      The noisy average, pytree like params (no client axis), in the deltas' dtypes.

    Raises:
      ValueError: a bad σ, C or scalar divisor (checked outside jit only).
    """
    totals, _ = holder_sums(clipped, masks)
    return noisy_mean(totals, key, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                      divisor=divisor, like=clipped)


def noisy_mean(totals: Params, key: jax.Array, *, noise_multiplier: float, clip_norm: float,
               divisor: Params | float, like: Params) -> Params:
    """(totals + N(0, (σC)²)) / divisor per coordinate, 0 and noise-free where divisor = 0.

    ``noisy_holder_average`` from the holders' sums Σ_i m_i·d_i of clipped deltas,
    so a server that streams the sums adds the same noise.

    Args:
      totals: the holders' sums, pytree like params (no client axis).
      key: PRNG key for the noise (split once per leaf).
      noise_multiplier: σ ≥ 0.
      clip_norm: C > 0.
      divisor: fixed and public, a pytree like ``totals`` or one scalar for all.
      like: pytree like ``totals`` whose dtypes the result takes.

    Returns:
      A pytree like ``totals`` in ``like``'s dtypes.

    Raises:
      ValueError: a bad σ, C or scalar divisor (checked outside jit only).
    """
    _check("noise_multiplier", noise_multiplier, low=0.0)
    _check("clip_norm", clip_norm, low=0.0, low_open=True)
    leaves, treedef = jax.tree_util.tree_flatten(totals)
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(divisor)):  # one for all
        if jnp.ndim(divisor) == 0:
            _check("divisor", divisor, low=0.0)
        divisor = jax.tree_util.tree_unflatten(treedef, [divisor] * len(leaves))
    keys = jax.tree_util.tree_unflatten(treedef, list(jax.random.split(key, len(leaves))))
    std = jnp.asarray(noise_multiplier, jnp.float32) * clip_norm

    def average(total, div, k, d):
        noisy = total + std * jax.random.normal(k, total.shape, jnp.float32)
        div = jnp.broadcast_to(_f32(div), total.shape)
        return jnp.where(div > 0, noisy / jnp.where(div > 0, div, 1.0), 0.0).astype(d.dtype)

    return jax.tree_util.tree_map(average, totals, divisor, keys, like)


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the privacy accountant needs dp-accounting: "
                          "pip install dp-accounting") from e
    return dp_accounting


def _round_event(dp, rounds: int, sampling_rate: float, noise_multiplier: float):
    """``rounds`` compositions of the Poisson-subsampled Gaussian mechanism."""
    return dp.SelfComposedDpEvent(
        dp.PoissonSampledDpEvent(sampling_rate, dp.GaussianDpEvent(noise_multiplier)), rounds)


def _history_event(dp, segments: Sequence[Segment], sampling_rate: float):
    """The rounds of every segment, composed (one segment: its own event, unwrapped)."""
    events = [_round_event(dp, int(n), float(sampling_rate), float(s))
              for n, s in segments if n > 0]
    return events[0] if len(events) == 1 else dp.ComposedDpEvent(events)


def _accountant(dp, accountant: str, pld_discretization: float):
    if accountant == "rdp":
        return dp.rdp.RdpAccountant()
    return dp.pld.PLDAccountant(value_discretization_interval=pld_discretization)


@contextlib.contextmanager
def _quiet_rdp():
    """RDP logs a warning for every order whose series does not converge (that order is
    simply left out of the minimum): noise, once per round, in a training log."""
    rdp_log = logging.getLogger("absl")
    level = rdp_log.level
    rdp_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        rdp_log.setLevel(level)


def _check_rounds(name: str, rounds: Any) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 0:
        raise ValueError(f"{name} must be a non-negative int, got {rounds!r}")


def _check_accounting(rounds: int, sampling_rate: float, delta: float, accountant: str,
                      pld_discretization: float, rounds_name: str = "rounds") -> None:
    _check_rounds(rounds_name, rounds)
    _check("sampling_rate", sampling_rate, low=0.0, high=1.0, low_open=True, high_open=False)
    _check("delta", delta, low=0.0, high=1.0, low_open=True)
    _check("pld_discretization", pld_discretization, low=0.0, low_open=True)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; expected one of {ACCOUNTANTS}")


def _check_segments(segments: Sequence[Segment], name: str) -> list[Segment]:
    """``segments`` as a list of ``(rounds, σ)`` pairs, each checked (ValueError naming it)."""
    out = []
    for i, seg in enumerate(segments):
        try:
            rounds, sigma = seg
        except (TypeError, ValueError):
            raise ValueError(f"{name}[{i}] must be a (num_rounds, noise_multiplier) pair, "
                             f"got {seg!r}") from None
        _check_rounds(f"{name}[{i}] num_rounds", rounds)
        _check(f"{name}[{i}] noise_multiplier", sigma, low=0.0)
        out.append((int(rounds), float(sigma)))
    return out


def epsilon_for_history(segments: Sequence[Segment], *, sampling_rate: float, delta: float,
                        accountant: str = "rdp", pld_discretization: float = 1e-4) -> float:
    """ε after the rounds of every segment ``(num_rounds_i, σ_i)``, composed.

    One step of the Poisson(q)-sampled Gaussian mechanism per round. A run whose σ
    changed (e.g. recalibrated for a new ``num_rounds`` on resume) spent
    ``num_rounds_i`` rounds at each ``σ_i``; its ε is this composition, not that of
    all its rounds at the latest σ. ``epsilon_after`` is its one-segment case.

    Args:
      segments: ``(num_rounds, noise_multiplier)`` pairs (``Segment``).
      sampling_rate: q, the Poisson sampling rate of clients per round, in (0, 1].
      delta: δ, in (0, 1).
      accountant: ``"rdp"`` (Rényi DP, dp_accounting's default orders) or ``"pld"``
        (privacy loss distributions, tighter, slower).
      pld_discretization: PLD's value discretisation interval (trades accuracy for
        speed).

    Returns:
      ε as a float. Segments of 0 rounds count for nothing; no rounds give ε = 0; a
      segment with σ = 0 and rounds > 0 gives ε = inf.

    Raises:
      ValueError: a bad segment or option.
      ImportError: dp-accounting is not installed (only when there are rounds).
    """
    _check_accounting(0, sampling_rate, delta, accountant, pld_discretization)
    segments = _check_segments(segments, "segments")
    if not any(n > 0 for n, _ in segments):
        return 0.0
    dp = _dp_accounting()
    event = _history_event(dp, segments, sampling_rate)
    with _quiet_rdp():
        acc = _accountant(dp, accountant, pld_discretization)
        return float(acc.compose(event).get_epsilon(float(delta)))


def epsilon_after(rounds: int, *, sampling_rate: float, noise_multiplier: float, delta: float,
                  accountant: str = "rdp", pld_discretization: float = 1e-4) -> float:
    """ε after ``rounds`` rounds of Poisson(q)-sampled clients with noise multiplier σ.

    ``epsilon_for_history([(rounds, σ)])``.

    Args:
      rounds: number of rounds, an int ≥ 0.
      sampling_rate: q, the Poisson sampling rate of clients per round, in (0, 1].
      noise_multiplier: σ ≥ 0.
      delta, accountant, pld_discretization: as in ``epsilon_for_history``.

    Returns:
      ε as a float: σ = 0 gives ε = inf; 0 rounds give ε = 0.

    Raises:
      ValueError: a bad option.
      ImportError: dp-accounting is not installed (only when there are rounds).
    """
    _check_accounting(rounds, sampling_rate, delta, accountant, pld_discretization)
    _check("noise_multiplier", noise_multiplier, low=0.0)
    return epsilon_for_history([(rounds, noise_multiplier)], sampling_rate=sampling_rate,
                               delta=delta, accountant=accountant,
                               pld_discretization=pld_discretization)


def calibrate_remaining(target_epsilon: float, spent_segments: Sequence[Segment],
                        remaining_rounds: int, *, sampling_rate: float, delta: float,
                        accountant: str = "rdp", pld_discretization: float = 1e-4,
                        tol: float = 1e-4) -> float:
    """Smallest σ (within ``tol``) for ``remaining_rounds`` more rounds within the target.

    That is, such that ``epsilon_for_history(spent_segments + [(remaining_rounds, σ)])``
    ≤ ``target_epsilon``. Uses ``dp_accounting.calibrate_dp_mechanism`` (Brent's
    method, then a check that the returned σ meets the target).

    Args:
      target_epsilon: the whole run's ε budget, > 0.
      spent_segments: the ``(num_rounds_i, σ_i)`` already run (``epsilon_for_history``);
        none gives ``calibrate_noise``.
      remaining_rounds: rounds still to run, an int ≥ 0.
      sampling_rate: q, the Poisson sampling rate of clients per round, in (0, 1].
      delta: δ, in (0, 1).
      accountant: ``"rdp"`` (Rényi DP, dp_accounting's default orders) or ``"pld"``
        (privacy loss distributions, tighter, slower).
      pld_discretization: PLD's value discretisation interval (trades accuracy for
        speed).
      tol: tolerance on σ.

    Returns:
      σ as a float; 0.0 for 0 remaining rounds (no noise needed) as long as the
      spent ε is within the target.

    Raises:
      ValueError: a bad option; or, naming both, the spent ε already reaches or
        exceeds the target (no σ for the remaining rounds can keep the run within
        it), or is too close to it for any σ up to 2**30.
      ImportError: dp-accounting is not installed (only when there are rounds).
    """
    _check_accounting(remaining_rounds, sampling_rate, delta, accountant, pld_discretization,
                      rounds_name="remaining_rounds")
    _check("target_epsilon", target_epsilon, low=0.0, low_open=True)
    _check("tol", tol, low=0.0, low_open=True)
    spent = [s for s in _check_segments(spent_segments, "spent_segments") if s[0] > 0]
    kw = dict(sampling_rate=sampling_rate, delta=delta, accountant=accountant,
              pld_discretization=pld_discretization)
    spent_eps = epsilon_for_history(spent, **kw) if spent else 0.0
    if spent_eps > target_epsilon or (remaining_rounds > 0 and spent_eps >= target_epsilon):
        raise ValueError(f"the rounds already run spent ε = {spent_eps:.4g} ≥ target_epsilon "
                         f"= {target_epsilon:g} (δ = {delta:g}): no noise multiplier for the "
                         f"{remaining_rounds} remaining rounds keeps the run within it")
    if remaining_rounds == 0:
        return 0.0
    dp = _dp_accounting()
    with _quiet_rdp():
        try:
            sigma = dp.calibrate_dp_mechanism(
                lambda: _accountant(dp, accountant, pld_discretization),
                lambda s: _history_event(dp, spent + [(int(remaining_rounds), s)],
                                         sampling_rate),
                float(target_epsilon), float(delta), tol=tol)
        except dp.mechanism_calibration.NoBracketIntervalFoundError:
            raise ValueError(f"the rounds already run spent ε = {spent_eps:.6g} (δ = "
                             f"{delta:g}), too close to target_epsilon = {target_epsilon:g} "
                             f"for any noise multiplier up to 2**30 over the "
                             f"{remaining_rounds} remaining rounds") from None
    return float(sigma)


def calibrate_noise(target_epsilon: float, rounds: int, *, sampling_rate: float, delta: float,
                    accountant: str = "rdp", pld_discretization: float = 1e-4,
                    tol: float = 1e-4) -> float:
    """Smallest noise multiplier σ (within ``tol``) whose ``epsilon_after`` ≤ ``target_epsilon``.

    ``calibrate_remaining`` with nothing spent.

    Args:
      target_epsilon: the ε budget, > 0.
      rounds: number of rounds, an int ≥ 0.
      sampling_rate, delta, accountant, pld_discretization, tol: as in
        ``calibrate_remaining``.

    Returns:
      σ as a float; 0 rounds need no noise (0.0).

    Raises:
      ValueError: a bad option, or a target no σ can meet.
      ImportError: dp-accounting is not installed (only when there are rounds).
    """
    _check_rounds("rounds", rounds)
    return calibrate_remaining(target_epsilon, [], rounds, sampling_rate=sampling_rate,
                               delta=delta, accountant=accountant,
                               pld_discretization=pld_discretization, tol=tol)
