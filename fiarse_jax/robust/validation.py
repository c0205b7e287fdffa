"""Server-side screening of client updates before aggregation.

``validate_updates`` returns ``(accepted, reason)`` per client; pass ``accepted``
as ``client_weights`` to ``aggregators.aggregate_deltas``. Only the coordinates a
client holds are inspected (the aggregators ignore the rest). The first failing
test, in this order, gives the reason (``REASONS[reason]``):

1. ``non_finite``: a NaN/±Inf among the held coordinates. Such clients are zeroed
   and left out of every statistic below, so they cannot poison the others.
2. ``norm_outlier``: the robust z-score |‖d‖ − med| / max(1.4826·MAD, s·med) of
   the L2 norm of the delta over its held coordinates exceeds ``z_threshold``,
   with med and MAD taken over the finite clients of the *same capacity level*
   (sub-models of one level hold about as many coordinates, so their norms are
   comparable; across levels they are not). The floor s = ``min_spread``
   (default 0.1) matters with the few clients per level of a round: the MAD of 5
   honest norms can be a few percent of their median and would flag ordinary
   ±30 % variation as extreme; it also covers MAD = 0 (more than half the level
   share one norm). With no spread at all (scale 0), z = 0. A level with fewer
   than 3 finite clients is not norm-tested: a median of two says nothing about
   which one is off.
3. ``direction``: the cosine between the client's delta and a reference update,
   over the coordinates the client holds, is below ``cosine_threshold``. The
   reference defaults to the coordinate-wise holder median of the finite updates
   (``aggregators.median``), robust to a minority of attackers; a server update
   from trusted data (FLTrust) can be passed as ``reference`` (no client axis).
   A zero delta, or a reference that is zero on the client's coordinates, has no
   direction and passes. The default threshold 0 rejects updates pointing against
   the consensus (as FLTrust's ReLU-clipped trust score).

4. ``reputation``: the client is ``excluded`` (``reputation.excluded``: flagged in too
   many earlier rounds). Checked first of all (an excluded client's update is refused
   unread, whatever it holds); excluded clients leave every statistic, as non-finite
   ones do.

``screen="core"`` runs tests 2 and 3 on the round's *core* instead: the coordinates
every screened client (finite, not excluded) holds. With partial models most
coordinates have few holders (on the default, three quarters of them are held only by
the round's ~3 capacity-1 clients), so per-coordinate statistics there are at the
attackers' mercy, and per-level norm statistics come from 3 or 4 clients. The core is
held by all of them: with FIARSE's nested levels it is the smallest level's kept set
(as it stands at the end of local training), so the norm z-score is taken over all the
round's clients in one group (same coordinates, comparable norms) and the direction
reference is the coordinate-wise median of all of them. A sign flip, a ×λ scale, noise
or a flipped consensus shows there against the honest majority. HeteroFL's and
FedRolex's levels are nested too (the leading units; one rolling window start for every
width), so their core is the smallest level's sub-model. Federated Dropout's random
per-client masks are not: its core is the units every client of the round happened to
keep, plus any parameter no policy masks, which may be little; a round with no core at
all falls back to ``held``.

``levels`` may be a traced int array: same-level statistics use an
[n_clients, n_clients] "same level" matrix, so the number of levels need not be
static. Thresholds and ``screen`` are static (``None`` disables a test). Everything
is jit-able.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from fiarse_jax.robust.aggregators import flatten_clients, masked_median, num_clients

Params = Any

#: Names of the ``reason`` codes returned by ``validate_updates``.
REASONS = ("ok", "non_finite", "norm_outlier", "direction", "reputation")
#: Where the norm and direction tests look: each client's held coordinates, or the core.
SCREENS = ("held", "core")
MIN_LEVEL_SIZE = 3  # finite clients a level needs before its norms are tested


@jax.jit
def robust_z(values: jax.Array, groups: jax.Array, valid: jax.Array,
             min_spread: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Robust z-score of each entry within its group, and the group's valid size.

    Per entry, |v − med| / max(1.4826·MAD, min_spread·|med|) with med and MAD over the
    ``valid`` entries of its group; z = 0 where that scale is 0.

    Args:
      values: float [n].
      groups: int [n], each entry's group (e.g. capacity level).
      valid: bool [n], the entries the statistics are taken over.
      min_spread: the floor s on the scale, relative to |med|.

    Returns:
      ``(z, group size)``: float [n], and int [n] the number of valid entries in
      each entry's group.
    """
    med, size = group_median(values, groups, valid)
    dev = jnp.abs(values - med)
    mad, _ = group_median(dev, groups, valid)   # a group's entries share its median
    scale = jnp.maximum(1.4826 * mad, min_spread * jnp.abs(med))
    return jnp.where(scale > 0, dev / jnp.where(scale > 0, scale, 1.0), 0.0), size


def group_median(values: jax.Array, groups: jax.Array,
                 valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per entry, the median of the ``valid`` entries of its group (0 where none), and
    their number; ``groups`` may be traced (an [n, n] "same group" matrix).

    Args:
      values: float [n].
      groups: int [n], each entry's group (e.g. capacity level).
      valid: bool [n], the entries the median is taken over.

    Returns:
      ``(median, group size)``: float32 [n] and int [n].
    """
    peers = (groups[:, None] == groups[None, :]) & valid[:, None]  # [peer j, entry i]
    return masked_median(jnp.broadcast_to(values[:, None], peers.shape), peers), peers.sum(axis=0)


def _cosine(x: jax.Array, h: jax.Array, reference: jax.Array) -> jax.Array:
    """[n] cosine of each row of ``x`` (0 where not held) with ``reference`` [P] restricted
    to the row's held columns; 1 where either side is zero there."""
    r = jnp.where(h, reference[None, :], 0.0)
    denom = jnp.sqrt((x ** 2).sum(axis=1)) * jnp.sqrt((r ** 2).sum(axis=1))
    return jnp.where(denom > 0, (x * r).sum(axis=1) / jnp.where(denom > 0, denom, 1.0), 1.0)


def held_finite(delta: Params, mask: Params) -> jax.Array:
    """One client (no client axis): whether every coordinate it holds is finite.

    Args:
      delta: the client's delta, pytree like params.
      mask: 0/1 pytree like ``delta``.

    Returns:
      bool scalar.
    """
    return jnp.all(jnp.stack([jnp.where(m > 0, jnp.isfinite(d), True).all() for d, m in zip(
        jax.tree_util.tree_leaves(delta), jax.tree_util.tree_leaves(mask))]))


@functools.partial(jax.jit, static_argnames=("z_threshold", "min_spread", "cosine_threshold",
                                             "screen"))
def _validate(deltas: Params, masks: Params, levels: jax.Array, reference: Params | None,
              excluded: jax.Array, z_threshold: float | None, min_spread: float,
              cosine_threshold: float | None, screen: str):
    if z_threshold is None and cosine_threshold is None:
        # Only the finite screen: per leaf, without the [n_clients, P] float32 copies the
        # statistics below need (for a 125 M-parameter model at 20 clients, 10 GB each).
        finite = jax.vmap(held_finite)(deltas, masks)
        reason = jnp.select([excluded, ~finite], [4, 1], 0).astype(jnp.int32)
        return reason == 0, reason
    d, h = flatten_clients(deltas), flatten_clients(masks) > 0
    finite = jnp.where(h, jnp.isfinite(d), True).all(axis=1)
    active = finite & ~excluded
    h = h & active[:, None]  # non-finite and excluded clients drop out of every statistic
    x = jnp.where(h, d, 0.0)
    groups = levels
    if screen == "core":
        core = (h | ~active[:, None]).all(axis=0) & active.any()   # held by every active client
        has_core = core.any()
        h = jnp.where(has_core, h & core[None, :], h)
        x = jnp.where(h, x, 0.0)
        groups = jnp.where(has_core, jnp.zeros_like(levels), levels)   # one group: same coords

    norm_outlier = jnp.zeros(levels.shape, bool)
    if z_threshold is not None:
        z, size = robust_z(jnp.sqrt((x ** 2).sum(axis=1)), groups, active, min_spread)
        norm_outlier = (size >= MIN_LEVEL_SIZE) & (z > z_threshold)

    direction = jnp.zeros(levels.shape, bool)
    if cosine_threshold is not None:
        ref = masked_median(x, h) if reference is None else flatten_clients(
            jax.tree_util.tree_map(lambda r: jnp.asarray(r)[None], reference))[0]
        direction = _cosine(x, h, ref) < cosine_threshold

    reason = jnp.select([excluded, ~finite, norm_outlier, direction], [4, 1, 2, 3], 0)
    return reason == 0, reason.astype(jnp.int32)


def validate_updates(deltas: Params, masks: Params, levels: jax.Array, *,
                     z_threshold: float | None = 3.5,
                     min_spread: float = 0.1,
                     cosine_threshold: float | None = 0.0,
                     reference: Params | None = None,
                     screen: str = "held",
                     excluded: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Screen client updates: ``(accepted, reason)`` per client. See the module docstring.

    Args:
      deltas: client deltas, pytree like params, leading client axis.
      masks: 0/1 pytree like ``deltas``.
      levels: int [n], each client's capacity level (may be traced).
      z_threshold: norm-outlier threshold (> 0), or None to skip the test. Static.
      min_spread: the floor s on the norm scale (finite, ≥ 0). Static.
      cosine_threshold: direction threshold in [-1, 1], or None to skip the test. Static.
      reference: the update the direction is compared with, pytree like params
        with no client axis (e.g. a server update from trusted data, FLTrust);
        default the holder median of the finite updates.
      screen: ``"held"`` (each client's held coordinates, norms per level) or ``"core"``
        (the coordinates every screened client holds; module docstring). Static.
      excluded: bool [n], clients refused outright (reason ``reputation``) and left out
        of every statistic; default none.

    Returns:
      ``(accepted bool[n], reason int32[n])``, ``reason`` an index into ``REASONS``.

    Raises:
      ValueError: a threshold out of range, mismatched ``deltas``/``masks``, or
        ``levels`` not of shape (n,).
    """
    if z_threshold is not None and not (isinstance(z_threshold, numbers.Real) and z_threshold > 0):
        raise ValueError(f"validate_updates: z_threshold = {z_threshold!r} must be > 0 or None")
    if not (isinstance(min_spread, numbers.Real) and 0 <= min_spread < math.inf):
        raise ValueError(f"validate_updates: min_spread = {min_spread!r} "
                         "must be a finite number ≥ 0")
    if cosine_threshold is not None and not (isinstance(cosine_threshold, numbers.Real)
                                             and -1 <= cosine_threshold <= 1):
        raise ValueError(f"validate_updates: cosine_threshold = {cosine_threshold!r} "
                         "must be in [-1, 1] or None")
    if screen not in SCREENS:
        raise ValueError(f"validate_updates: screen = {screen!r} must be one of {SCREENS}")
    levels = jnp.asarray(levels)
    n = num_clients(deltas, masks)
    if levels.shape != (n,):
        raise ValueError(f"validate_updates: levels has shape {levels.shape}; expected ({n},)")
    excluded = jnp.zeros(n, bool) if excluded is None else jnp.asarray(excluded, bool)
    if excluded.shape != (n,):
        raise ValueError(f"validate_updates: excluded has shape {excluded.shape}; "
                         f"expected ({n},)")
    return _validate(deltas, masks, levels, reference, excluded,
                     None if z_threshold is None else float(z_threshold), float(min_spread),
                     None if cosine_threshold is None else float(cosine_threshold), screen)
