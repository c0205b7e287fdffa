"""Attack simulation: seeded malicious clients and what they send, as pure functions.

Used to stress robust aggregation with partial models. ``choose_attackers`` fixes, from a
seed, which clients of the population are malicious for the whole run; each round the engine
passes the sampled rows' flags to ``attack_updates``, which rewrites only those rows of the
client-stacked ``deltas``. Attackers keep their sub-model: masks are never changed, so a
coordinate is attacked only through the clients that hold it, at whatever capacity level they
sit. ``flip_labels`` poisons the attackers' data instead of their updates.

Update attacks (``delta = old − new``, as everywhere):
* ``none``: unchanged.
* ``sign_flip``: −d (gradient ascent on the client's objective).
* ``scale``: λ·d (model-replacement style boosting; λ < 0 combines it with a flip).
* ``gaussian``: the update replaced by N(0, std²) on the held coordinates.
* ``free_rider``: no work — the whole row zero, or ``stale`` (e.g. the client's last update,
  same shape) when given.
* ``nan``: non-finite values on every held coordinate, NaN and +Inf alternating by flat index
  within each leaf, so a validator has to catch both.

Coordinated, omniscient attacks (every attacker of the round sends the same values on the
coordinates it holds, computed from the round's honest rows, as in the literature's
evaluations). Honest statistics of a coordinate are over the honest rows that hold it; where
none does, the attacker keeps its own value there.
* ``alie`` ("A little is enough", Baruch et al., NeurIPS 2019): μ − z·σ per coordinate (honest
  mean and population std), z = Φ⁻¹((n − s)/n), s = ⌊n/2 + 1⌋ − f for n rows and f attackers
  (s clamped to ≥ 1 so z stays finite with an attacker majority). Small shifts inside the
  honest spread, which coordinate-wise robust rules (median, trimmed mean, Krum) let through.
* ``adaptive``: the flipped honest consensus −(honest holder mean), restricted to the held
  coordinates and rescaled to the median held-coordinate L2 norm of the honest rows of the
  attacker's capacity level (all honest rows when the level has none this round); zeros where
  that direction vanishes on the held coordinates. Built to pass the norm screen of
  ``validation`` on held coordinates (its norm is the very median that screen centres on),
  so that only a direction screen can catch it (on the core its norm is typical too, but
  not matched exactly). Needs ``levels``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm as jnorm

from fiarse_jax.robust.validation import group_median


@dataclasses.dataclass(frozen=True)
class AttackOptions:
    """The simulated attack (``config.attack``; defaults: configs/default.py's, none).

    Attributes:
      kind: ``none``, ``label_flip`` (on the data) or one of ``KINDS`` (on the updates).
      fraction: the share of clients that attack.
      scale: λ of ``scale``.
      noise_std: the standard deviation of ``gaussian``.
      levels: the capacity levels attackers are drawn from (empty: all).
    """

    kind: str = "none"
    fraction: float = 0.0
    scale: float = 10.0
    noise_std: float = 1.0
    levels: tuple = ()

Params = Any
KINDS = ("none", "sign_flip", "scale", "gaussian", "free_rider", "nan", "alie", "adaptive")
COORDINATED = ("alie", "adaptive")


def _finite(name: str, value: Any, *, nonneg: bool = False) -> None:
    """ValueError naming ``value`` unless finite (and ≥ 0 when ``nonneg``); tracers pass."""
    if isinstance(value, jax.core.Tracer):
        return
    v = float(value)
    if not math.isfinite(v) or (nonneg and v < 0):
        raise ValueError(f"{name} must be a finite{' non-negative' if nonneg else ''} number, "
                         f"got {value!r}")


def choose_attackers(seed: int, num_clients: int, fraction: float, *,
                     levels: Sequence[int] | None = None,
                     assignment: np.ndarray | None = None) -> np.ndarray:
    """bool[num_clients]: ⌊fraction·num_clients + ½⌋ malicious clients drawn from ``seed``.

    Without ``levels`` attackers may sit at any capacity level. With ``levels`` (level
    indices) they are drawn only among clients whose ``assignment[i]`` (client → level index,
    as ``build.assign_capacities``) is in ``levels``; the count is still a fraction of the
    whole population, so there must be enough eligible clients.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) \
            or num_clients < 1:
        raise ValueError(f"num_clients must be a positive int, got {num_clients!r}")
    if not (isinstance(fraction, (int, float, np.floating)) and 0.0 <= fraction < 1.0):
        raise ValueError(f"attack fraction must be in [0, 1), got {fraction!r}")
    count = int(math.floor(fraction * num_clients + 0.5))
    eligible = np.arange(num_clients)
    if levels is not None:
        if assignment is None:
            raise ValueError("levels given without assignment (the client -> level index array)")
        assignment = np.asarray(assignment)
        if assignment.shape != (num_clients,):
            raise ValueError(f"assignment must have shape ({num_clients},), "
                             f"got {assignment.shape}")
        unknown = sorted(set(int(l) for l in levels) - set(assignment.tolist()))
        if unknown:
            raise ValueError(f"levels {unknown} have no clients in the assignment")
        eligible = eligible[np.isin(assignment, list(levels))]
        if len(eligible) < count:
            raise ValueError(f"{count} attackers requested (fraction {fraction!r}) but levels "
                             f"{list(levels)} have only {len(eligible)} clients")
    chosen = np.random.default_rng(seed).choice(eligible, size=count, replace=False)
    flags = np.zeros(num_clients, bool)
    flags[chosen] = True
    return flags


def _rows(flags: jax.Array, x: jax.Array) -> jax.Array:
    """Per-row flags broadcast against a client-stacked array."""
    return flags.reshape((-1,) + (1,) * (x.ndim - 1))


def _alternating_nonfinite(shape: tuple[int, ...], dtype) -> jax.Array:
    idx = jnp.arange(math.prod(shape[1:])).reshape(shape[1:])
    return jnp.broadcast_to(jnp.where(idx % 2 == 0, jnp.nan, jnp.inf), shape).astype(dtype)


def alie_z(is_attacker: jax.Array) -> jax.Array:
    """Baruch et al.'s z = Φ⁻¹((n − s)/n), s = max(⌊n/2 + 1⌋ − f, 1), for the round's n rows
    and f attackers (``is_attacker`` bool[n], may be traced); float32 scalar."""
    flags = jnp.asarray(is_attacker, bool)
    n = flags.shape[0]
    s = jnp.maximum(n // 2 + 1 - flags.sum(), 1)
    return jnorm.ppf((n - s).astype(jnp.float32) / n)


def _honest_moments(d: jax.Array, honest: jax.Array, *, std: bool):
    """Per coordinate of one leaf: (count, mean[, population std]) over the ``honest`` holders."""
    x = jnp.where(honest, d.astype(jnp.float32), 0.0)
    count = honest.sum(axis=0)
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    mu = x.sum(axis=0) / denom
    if not std:
        return count, mu
    var = jnp.where(honest, (x - mu) ** 2, 0.0).sum(axis=0) / denom
    return count, mu, jnp.sqrt(var)


def _row_sum(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1).sum(axis=1)


def _coordinated(kind: str, deltas: Params, masks: Params, flags: jax.Array,
                 levels: jax.Array | None) -> Params:
    """The ``alie`` / ``adaptive`` replacement values (before selecting the attackers' rows)."""
    leaves, treedef = jax.tree_util.tree_flatten(deltas)
    held = [jnp.asarray(m) > 0 for m in treedef.flatten_up_to(masks)]
    honest = [h & ~_rows(flags, h) for h in held]
    if kind == "alie":
        z = alie_z(flags)
        bad = []
        for d, h, hon in zip(leaves, held, honest):
            count, mu, sigma = _honest_moments(d, hon, std=True)
            bad.append(jnp.where(h & (count > 0), (mu - z * sigma)[None], d))
        return treedef.unflatten(bad)
    # adaptive: u = −(honest holder mean), divided by its max |u| so the norms below neither
    # overflow nor underflow in float32 (only its direction matters).
    u = [-_honest_moments(d, hon, std=False)[1] for d, hon in zip(leaves, honest)]
    top = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0.0) for x in u]))
    u = [x / jnp.where(top > 0, top, 1.0) for x in u]
    u_norm = jnp.sqrt(sum(_row_sum(jnp.where(h, x[None], 0.0) ** 2) for x, h in zip(u, held)))
    norms = jnp.sqrt(sum(_row_sum(jnp.where(h, d.astype(jnp.float32), 0.0) ** 2)
                         for d, h in zip(leaves, held)))
    by_level, peers = group_median(norms, levels, ~flags)
    overall, _ = group_median(norms, jnp.zeros_like(levels), ~flags)
    target = jnp.where(peers > 0, by_level, overall)
    factor = jnp.where(u_norm > 0, target / jnp.where(u_norm > 0, u_norm, 1.0), 0.0)
    return treedef.unflatten([jnp.where(h, x[None] * _rows(factor, h), d)
                              for d, h, x in zip(leaves, held, u)])


def attack_updates(kind: str, deltas: Params, masks: Params, is_attacker: jax.Array,
                   key: jax.Array, *, scale: float = 10.0, noise_std: float = 1.0,
                   stale: Params | None = None, levels: jax.Array | None = None) -> Params:
    """``deltas`` with the attackers' rows replaced according to ``kind`` (see module doc).

    Honest rows and ``masks`` are untouched; ``gaussian``, ``nan``, ``alie`` and ``adaptive``
    rewrite only held coordinates (others keep their value, which the aggregator ignores),
    ``free_rider`` the whole row. Jit-able with ``kind`` static.

    Args:
      kind: one of ``KINDS``. Static.
      deltas: client deltas (old − new), pytree like params, leading client axis.
      masks: 0/1 pytree like ``deltas``: the coordinates each client holds.
      is_attacker: bool [n_clients] for those rows (may be traced).
      key: PRNG key, used by ``gaussian`` only.
      scale: λ of ``scale`` (finite).
      noise_std: std of ``gaussian`` (finite, ≥ 0).
      stale: what ``free_rider`` sends, pytree like ``deltas``; default zeros.
      levels: int [n_clients], each row's capacity level index (may be traced); required
        by ``adaptive``, ignored otherwise.

    Returns:
      A pytree like ``deltas``, same dtypes.

    Raises:
      ValueError: an unknown ``kind``, a bad ``scale``/``noise_std``, or ``adaptive``
        without ``levels`` or with ``levels`` not of shape (n_clients,).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown attack kind {kind!r}; expected one of {KINDS}")
    _finite("scale", scale)
    _finite("noise_std", noise_std, nonneg=True)
    if kind == "none":
        return deltas
    flags = jnp.asarray(is_attacker, bool)
    if kind in COORDINATED:
        if kind == "adaptive":
            if levels is None:
                raise ValueError("attack kind 'adaptive' needs levels (each row's capacity "
                                 "level index) to match its level's honest norms")
            levels = jnp.asarray(levels)
            if levels.shape != flags.shape:
                raise ValueError(f"attack kind 'adaptive': levels has shape {levels.shape}; "
                                 f"expected {flags.shape}")
        bad = _coordinated(kind, deltas, masks, flags, levels)
        return jax.tree_util.tree_map(
            lambda d, b: jnp.where(_rows(flags, d), b.astype(d.dtype), d), deltas, bad)
    leaves, treedef = jax.tree_util.tree_flatten(deltas)
    keys = jax.tree_util.tree_unflatten(treedef, list(jax.random.split(key, len(leaves))))
    stale = jax.tree_util.tree_map(jnp.zeros_like, deltas) if stale is None else stale

    def attack(d, m, k, old):
        held = jnp.asarray(m) > 0
        if kind == "sign_flip":
            bad = -d
        elif kind == "scale":
            bad = jnp.asarray(scale, d.dtype) * d
        elif kind == "gaussian":
            bad = jnp.where(held, noise_std * jax.random.normal(k, d.shape, jnp.float32), d)
        elif kind == "free_rider":
            bad = jnp.asarray(old)
        else:  # nan
            bad = jnp.where(held, _alternating_nonfinite(d.shape, d.dtype), d)
        return jnp.where(_rows(flags, d), bad.astype(d.dtype), d)

    return jax.tree_util.tree_map(attack, deltas, masks, keys, stale)


def flip_labels(y: jax.Array, num_classes: int, is_attacker_rows: jax.Array) -> jax.Array:
    """Label flipping c → C−1−c on the attackers' rows of client-stacked labels ``y``.

    ``y``: [clients, n] (``ClientData.y`` stacked) or any array whose leading axis is the
    client; padding rows are flipped too, harmlessly (they are never read).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 2:
        raise ValueError(f"num_classes must be an int ≥ 2, got {num_classes!r}")
    y = jnp.asarray(y)
    flags = jnp.asarray(is_attacker_rows, bool)
    return jnp.where(_rows(flags, y), (num_classes - 1 - y).astype(y.dtype), y)
