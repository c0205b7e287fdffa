"""Server aggregation as pytree reductions over a leading client axis.

Sign convention: ``delta = old − new`` (what a client subtracted), so the server
applies ``w ← w − η_g · avg`` (the authors' code, η_g = 1 by default).

Every coordinate is averaged over the clients that hold it (mask = 1); a
coordinate nobody holds keeps its value. Holders are counted by the mask, not by
``delta ≠ 0`` as the authors' code does: a kept weight whose update is exactly 0
still counts (it voted "no change"). Normalisation parameters, held by everyone,
are averaged over all participants. No data-size weighting (as the authors).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Params = Any


def _f32(a: jax.Array) -> jax.Array:
    return jnp.asarray(a).astype(jnp.float32)


def held(delta: jax.Array, mask: jax.Array) -> jax.Array:
    """``m·d`` in float32, selected where ``m > 0`` and 0 elsewhere.

    Whatever a client sends outside its mask (NaN, ±Inf) is dropped, where a
    product would keep it (NaN·0 = NaN).

    Args:
      delta: deltas, any shape (with or without a client axis).
      mask: the 0/1 mask, same shape.

    Returns:
      float32 array shaped like ``delta``.
    """
    m = _f32(mask)
    return jnp.where(m > 0, _f32(delta) * m, 0.0)


def holder_sums(deltas: Params, masks: Params) -> tuple[Params, Params]:
    """(Σ_i m_i·d_i, Σ_i m_i) per coordinate over the leading client axis, in float32.

    Counts stay exact up to 2**24 clients, even for bf16 masks; entries outside a
    client's mask are ignored, even NaN (``held``).

    Args:
      deltas: pytree like params, leading client axis.
      masks: 0/1 pytree like ``deltas``.

    Returns:
      ``(totals, counts)``: two float32 pytrees like params (no client axis).
    """
    totals = jax.tree_util.tree_map(lambda d, m: held(d, m).sum(axis=0), deltas, masks)
    return totals, jax.tree_util.tree_map(lambda m: _f32(m).sum(axis=0), masks)


def holder_mean(totals: Params, counts: Params, like: Params) -> Params:
    """``totals / counts`` per coordinate (0 where the count is 0), in ``like``'s dtypes.

    Args:
      totals: holders' sums Σ_i m_i·d_i, pytree like params.
      counts: holder counts Σ_i m_i, pytree like params.
      like: pytree whose leaf dtypes the result takes (its shapes are not used).

    Returns:
      The holder mean, pytree like ``totals``.
    """
    return jax.tree_util.tree_map(
        lambda t, n, p: jnp.where(n > 0, t / jnp.maximum(n, 1), 0).astype(p.dtype),
        totals, counts, like)


def holder_average(deltas: Params, masks: Params) -> tuple[Params, Params]:
    """(Σ_i m_i·d_i / Σ_i m_i, Σ_i m_i) per coordinate; 0 where no client holds it.

    Args:
      deltas: pytree like params, leading client axis.
      masks: 0/1 pytree like ``deltas``.

    Returns:
      ``(avg, counts)``: ``avg`` in the deltas' dtypes, ``counts`` float32, both
      pytrees like params (no client axis).
    """
    totals, counts = holder_sums(deltas, masks)
    return holder_mean(totals, counts, deltas), counts


def apply_update(params: Params, agg: Params, server_lr: float = 1.0) -> Params:
    """``w ← w − η_g · agg`` per leaf, in each parameter's dtype.

    Args:
      params: the global parameter pytree.
      agg: the aggregated delta, pytree like ``params``.
      server_lr: the server learning rate η_g.

    Returns:
      The new parameters, pytree like ``params``.
    """
    return jax.tree_util.tree_map(lambda p, a: p - jnp.asarray(server_lr, p.dtype) * a,
                                  params, agg)


@jax.jit
def aggregate(params: Params, deltas: Params, masks: Params, *,
              server_lr: float = 1.0) -> Params:
    """New global params: each coordinate moves by −η_g × its holders' mean delta.

    With the client axis sharded over devices the sums are cross-device reductions.

    Args:
      params: the global parameter pytree.
      deltas: client deltas (old − new), pytree like ``params`` with a leading
        client axis.
      masks: 0/1 pytree like ``deltas``: the coordinates each client holds.
      server_lr: the server learning rate η_g.

    Returns:
      The new parameters, pytree like ``params``; a coordinate no client holds
      keeps its value.
    """
    return apply_update(params, holder_average(deltas, masks)[0], server_lr)
