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
use, so this module imports without it).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fiarse_jax.server import holder_sums

Params = Any
ACCOUNTANTS = ("rdp", "pld")


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

    ``deltas``/``masks`` carry a leading client axis. The norm of client i is taken over the
    coordinates it holds, across all leaves; coordinates it does not hold come back 0. Updates
    already within the bound are unchanged. The norms are diagnostics, not private.
    """
    _check("clip_norm", clip_norm, low=0.0, low_open=True)
    held = jax.tree_util.tree_map(lambda d, m: _f32(d) * _f32(m), deltas, masks)
    sq = [jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1) for x in jax.tree_util.tree_leaves(held)]
    norms = jnp.sqrt(sum(sq))
    factor = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-30))

    def scale(x, d):
        return (x * factor.reshape((-1,) + (1,) * (x.ndim - 1))).astype(d.dtype)

    return jax.tree_util.tree_map(scale, held, deltas), norms


def expected_holders(level_masks: Params, clients_per_level: Sequence[int],
                     sampling_rate: float) -> Params:
    """Fixed divisor per coordinate: q · Σ_L n_L · m_L (expected sampled holders).

    ``level_masks`` has a leading level axis (one 0/1 mask per capacity level, or keep
    probabilities for random masks); ``clients_per_level`` the nominal (public) client count
    per level, each ≥ 1 so that every coordinate a client could hold gets noise.
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

    ``clipped``: ``clip_updates`` output (leading client axis; any number of clients,
    including a Poisson-sampled cohort). ``divisor``: fixed and public — ``expected_holders``,
    or a scalar such as the expected cohort size q·N for every coordinate. Never the realised
    holder count (see the module docstring). Jit-able; the result has the deltas' dtypes.
    """
    totals, _ = holder_sums(clipped, masks)
    return noisy_mean(totals, key, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                      divisor=divisor, like=clipped)


def noisy_mean(totals: Params, key: jax.Array, *, noise_multiplier: float, clip_norm: float,
               divisor: Params | float, like: Params) -> Params:
    """(totals + N(0, (σC)²)) / divisor per coordinate, 0 and noise-free where divisor = 0,
    in ``like``'s dtypes: ``noisy_holder_average`` from the holders' sums Σ_i m_i·d_i of
    clipped deltas (so a server that streams the sums adds the same noise)."""
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


def _accountant(dp, accountant: str, pld_discretization: float):
    if accountant == "rdp":
        return dp.rdp.RdpAccountant()
    return dp.pld.PLDAccountant(value_discretization_interval=pld_discretization)


def _check_accounting(rounds: int, sampling_rate: float, delta: float, accountant: str,
                      pld_discretization: float) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative int, got {rounds!r}")
    _check("sampling_rate", sampling_rate, low=0.0, high=1.0, low_open=True, high_open=False)
    _check("delta", delta, low=0.0, high=1.0, low_open=True)
    _check("pld_discretization", pld_discretization, low=0.0, low_open=True)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; expected one of {ACCOUNTANTS}")


def epsilon_after(rounds: int, *, sampling_rate: float, noise_multiplier: float, delta: float,
                  accountant: str = "rdp", pld_discretization: float = 1e-4) -> float:
    """ε after ``rounds`` rounds of Poisson(q)-sampled clients with noise multiplier σ.

    ``accountant``: "rdp" (Rényi DP, dp_accounting's default orders) or "pld" (privacy loss
    distributions, tighter, slower; ``pld_discretization`` trades accuracy for speed).
    σ = 0 gives ε = inf; 0 rounds give ε = 0.
    """
    _check_accounting(rounds, sampling_rate, delta, accountant, pld_discretization)
    _check("noise_multiplier", noise_multiplier, low=0.0)
    if rounds == 0:
        return 0.0
    dp = _dp_accounting()
    acc = _accountant(dp, accountant, pld_discretization)
    event = _round_event(dp, int(rounds), float(sampling_rate), float(noise_multiplier))
    # RDP logs a warning for every order whose series does not converge (that order is
    # simply left out of the minimum): noise, once per round, in a training log.
    rdp_log = logging.getLogger("absl")
    level = rdp_log.level
    rdp_log.setLevel(logging.ERROR)
    try:
        return float(acc.compose(event).get_epsilon(float(delta)))
    finally:
        rdp_log.setLevel(level)


def calibrate_noise(target_epsilon: float, rounds: int, *, sampling_rate: float, delta: float,
                    accountant: str = "rdp", pld_discretization: float = 1e-4,
                    tol: float = 1e-4) -> float:
    """Smallest noise multiplier σ (within ``tol``) whose ``epsilon_after`` ≤ ``target_epsilon``.

    Uses ``dp_accounting.calibrate_dp_mechanism`` (Brent's method, then a check that the
    returned σ meets the target). 0 rounds need no noise.
    """
    _check_accounting(rounds, sampling_rate, delta, accountant, pld_discretization)
    _check("target_epsilon", target_epsilon, low=0.0, low_open=True)
    _check("tol", tol, low=0.0, low_open=True)
    if rounds == 0:
        return 0.0
    dp = _dp_accounting()
    sigma = dp.calibrate_dp_mechanism(
        lambda: _accountant(dp, accountant, pld_discretization),
        lambda s: _round_event(dp, int(rounds), float(sampling_rate), s),
        float(target_epsilon), float(delta), tol=tol)
    return float(sigma)
