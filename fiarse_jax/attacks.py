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
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = Any
KINDS = ("none", "sign_flip", "scale", "gaussian", "free_rider", "nan")


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


def attack_updates(kind: str, deltas: Params, masks: Params, is_attacker: jax.Array,
                   key: jax.Array, *, scale: float = 10.0, noise_std: float = 1.0,
                   stale: Params | None = None) -> Params:
    """``deltas`` with the attackers' rows replaced according to ``kind`` (see module doc).

    ``deltas``/``masks`` (and ``stale``) carry a leading client axis; ``is_attacker`` is
    bool[clients] for those rows. Honest rows and ``masks`` are untouched; ``gaussian`` and
    ``nan`` rewrite only held coordinates (others keep their value, which the aggregator
    ignores), ``free_rider`` the whole row. Jit-able with ``kind`` static; ``key`` is used
    by ``gaussian`` only.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown attack kind {kind!r}; expected one of {KINDS}")
    _finite("scale", scale)
    _finite("noise_std", noise_std, nonneg=True)
    if kind == "none":
        return deltas
    leaves, treedef = jax.tree_util.tree_flatten(deltas)
    keys = jax.tree_util.tree_unflatten(treedef, list(jax.random.split(key, len(leaves))))
    stale = jax.tree_util.tree_map(jnp.zeros_like, deltas) if stale is None else stale
    flags = jnp.asarray(is_attacker, bool)

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
