"""Mask-aware robust aggregation of client deltas, selected by name.

In model-heterogeneous FL each client holds a sub-model, so every rule is
defined per coordinate over the clients that *hold* it (mask = 1) — the
"holders" — never over all clients: a non-holder's delta is not a vote for 0.
Inputs follow ``server``: ``deltas`` (old − new; the server applies
``w ← w − η·agg``) and 0/1 ``masks`` of the same structure, both with a leading
client axis. Every rule returns ``(agg, counts)``: ``counts`` is how many clients
entered the rule at each coordinate (holders; for multi-Krum the *selected*
holders) and ``agg`` is 0 wherever ``counts`` is 0, i.e. the model is unchanged
there. Whatever a client sends outside its mask is ignored (even NaN/Inf).

Rules (``AGGREGATORS``), with n the number of holders of a coordinate:

* ``mean``: Σ m·d / Σ m, ``server.holder_average``.
* ``median``: the holders' median (even n: mean of the two middle values).
* ``trimmed_mean(beta)``, 0 ≤ β < 0.5: drop the k = ⌊β·n⌋ largest and k smallest
  holder values and average the n − 2k left. Since 2k ≤ 2β·n < n, at least one
  value always stays; coordinates with few holders (n < 1/β) are not trimmed.
* ``norm_bounded(max_norm)``: scale each client's whole delta (L2 over all the
  coordinates it holds) down to norm ≤ ``max_norm``, then ``mean``.
* ``multi_krum(num_byzantine f, num_selected m)``: Krum scores over whole
  clients, then ``mean`` over the m selected clients only. The distance between
  two clients is the *mean* squared difference over the coordinates both hold
  (raw sums would favour small sub-models, which share fewer coordinates with
  everyone); a pair that shares nothing is at distance +∞. A client's score sums
  its k = max(p − f − 2, 1) smallest distances to the others, p being the number
  of participating clients (holding anything), and the m lowest scores win
  (ties: lower client index). With partial models, a selected client contributes
  all its coordinates and an unselected one none, so a coordinate held only by
  unselected clients (e.g. the part only large-capacity clients train) gets 0
  this round. Needs n_clients > 2f + 2 and 1 ≤ m ≤ n_clients − f (Blanchard et
  al., 2017). The count is over participants: m defaults to p − f, and a given m is
  capped at p − f, so a client refused before the rule (non-finite, a screen,
  reputation: a non-holder everywhere) does not let one more suspect through; with
  p ≤ f nobody is selected (the model stays unchanged).

``aggregate_deltas(..., client_weights=w)`` takes the accept/reject vector from
``validation.validate_updates``: rejected clients (w = 0) become non-holders
everywhere, so a coordinate only rejected clients hold gets 0.

The rule functions check their options in Python (they are static: pass Python
numbers, also under ``jax.jit``) and run a jitted reduction: order statistics
come from one sort along the client axis with non-holders pushed to +∞, so
holders fill ranks 0 … n−1 of every coordinate. The leaves are first concatenated
into one [n_clients, P] float32 matrix (a copy, as the sort makes anyway) so each
rule is one reduction; results come back in the deltas' dtype. Multi-Krum's
pairwise distances go one client at a time (O(n·P) memory, not O(n²·P)).
"""
from __future__ import annotations

import functools
import itertools
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fiarse_jax.core.server import holder_average
from fiarse_jax.utils import options as options_lib

Params = Any
Aggregator = Callable[..., tuple[Params, Params]]


# ----------------------------------------------------------------------------- helpers

def num_clients(deltas: Params, masks: Params) -> int:
    """Length of the leading client axis, checking that ``deltas`` and ``masks`` match.

    Args:
      deltas: pytree with a leading client axis on every leaf.
      masks: pytree of the same structure and leaf shapes.

    Returns:
      The number of clients n.

    Raises:
      ValueError: different structures or shapes, or no common leading axis.
    """
    shapes = [jnp.shape(x) for x in jax.tree_util.tree_leaves(deltas)]
    mask_shapes = [jnp.shape(m) for m in jax.tree_util.tree_leaves(masks)]
    leading = {s[0] for s in shapes if s}
    if (jax.tree_util.tree_structure(deltas) != jax.tree_util.tree_structure(masks)
            or shapes != mask_shapes or len(leading) != 1 or () in shapes):
        raise ValueError("deltas and masks need the same structure and leaf shapes, with one "
                         f"leading client axis; got {shapes} and {mask_shapes}")
    return leading.pop()


def flatten_clients(tree: Params) -> jax.Array:
    """Every leaf's per-client entries, concatenated into one matrix.

    Args:
      tree: pytree with a leading client axis n on every leaf.

    Returns:
      float32 array [n_clients, P], P the number of scalars per client.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    n = leaves[0].shape[0]
    return jnp.concatenate([x.reshape(n, -1).astype(jnp.float32) for x in leaves], axis=1)


def _unflatten(flat: jax.Array, like: Params, dtype: Any = None) -> Params:
    """Inverse of ``flatten_clients`` for a [P] vector: leaves shaped ``x.shape[1:]``."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    sizes = [math.prod(x.shape[1:]) for x in leaves]
    parts = jnp.split(flat, list(itertools.accumulate(sizes))[:-1])
    return treedef.unflatten([p.reshape(x.shape[1:]).astype(dtype or x.dtype)
                              for p, x in zip(parts, leaves)])


def _held(deltas: Params, masks: Params) -> tuple[jax.Array, jax.Array]:
    """(x, h): [n, P] deltas, 0 wherever not held (so NaN there cannot leak), and held."""
    num_clients(deltas, masks)
    h = flatten_clients(masks) > 0
    return jnp.where(h, flatten_clients(deltas), 0.0), h


def _result(avg: jax.Array, h: jax.Array, deltas: Params) -> tuple[Params, Params]:
    """(agg, counts) pytrees from a [P] aggregate and the [n, P] holders that made it."""
    return _unflatten(avg, deltas), _unflatten(h.sum(axis=0), deltas, jnp.float32)


def weight_masks(masks: Params, client_weights: jax.Array) -> Params:
    """Masks with rejected clients (``client_weights[i] ≤ 0``) turned into non-holders.

    Args:
      masks: 0/1 pytree, leading client axis.
      client_weights: [n_clients] accept (> 0) / reject (≤ 0), e.g. bool.

    Returns:
      A pytree like ``masks`` (same dtypes), all 0 on rejected clients.
    """
    keep = jnp.asarray(client_weights) > 0
    return jax.tree_util.tree_map(
        lambda m: jnp.where(keep.reshape((-1,) + (1,) * (m.ndim - 1)), m, 0), masks)


def _window_mean(x: jax.Array, h: jax.Array, window: Callable[[jax.Array], tuple]) -> jax.Array:
    """Per column, the mean of the held values of rank lo … hi−1 (ascending),
    ``(lo, hi) = window(n)`` for n holders; 0 where n = 0."""
    n = h.sum(axis=0)
    ordered = jnp.sort(jnp.where(h, x, jnp.inf), axis=0)  # holders take ranks 0 … n−1
    lo, hi = window(n)
    rank = jnp.arange(x.shape[0])[:, None]
    total = jnp.where((rank >= lo) & (rank < hi), ordered, 0.0).sum(axis=0)
    return jnp.where(n > 0, total / jnp.maximum(hi - lo, 1), 0.0)


def _median_window(n: jax.Array) -> tuple[jax.Array, jax.Array]:
    return (n - 1) // 2, n // 2 + 1


def masked_median(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Median along axis 0 of a 2-D ``x`` over the entries with ``mask`` true.

    An even count gives the mean of the two middle values; 0 where none.

    Args:
      x: [n, P]; non-masked entries may hold anything.
      mask: bool [n, P].

    Returns:
      float32 [P].
    """
    return _window_mean(x.astype(jnp.float32), mask, _median_window)


def _holder_mean(x: jax.Array, h: jax.Array) -> jax.Array:
    return holder_average(x, h.astype(jnp.float32))[0]


# ----------------------------------------------------------------------------- rules

@jax.jit
def mean(deltas: Params, masks: Params) -> tuple[Params, Params]:
    """Holder average Σ m·d / Σ m (``server.holder_average``).

    Args:
      deltas: client deltas (old − new), pytree like params, leading client axis.
      masks: 0/1 pytree like ``deltas``: the coordinates each client holds.

    Returns:
      ``(agg, counts)``, pytrees like params (no client axis): ``agg`` in the deltas'
      dtypes, 0 where ``counts`` is 0; ``counts`` float32, the holders per coordinate.
    """
    x, h = _held(deltas, masks)
    return _result(_holder_mean(x, h), h, deltas)


@jax.jit
def median(deltas: Params, masks: Params) -> tuple[Params, Params]:
    """Coordinate-wise median over holders (even n: mean of the two middle values).

    Args:
      deltas: client deltas (old − new), pytree like params, leading client axis.
      masks: 0/1 pytree like ``deltas``: the coordinates each client holds.

    Returns:
      ``(agg, counts)``, pytrees like params (no client axis): ``agg`` in the deltas'
      dtypes, 0 where ``counts`` is 0; ``counts`` float32, the holders per coordinate.
    """
    x, h = _held(deltas, masks)
    return _result(masked_median(x, h), h, deltas)


@functools.partial(jax.jit, static_argnames="beta")
def _trimmed_mean(deltas: Params, masks: Params, beta: float) -> tuple[Params, Params]:
    def window(n):
        k = jnp.floor(beta * n).astype(n.dtype)
        return k, n - k

    x, h = _held(deltas, masks)
    return _result(_window_mean(x, h, window), h, deltas)


def trimmed_mean(deltas: Params, masks: Params, *, beta: float = 0.1) -> tuple[Params, Params]:
    """Per coordinate, drop the ⌊β·n⌋ largest and smallest holder values, average the rest.

    Args:
      deltas: client deltas (old − new), pytree like params, leading client axis.
      masks: 0/1 pytree like ``deltas``: the coordinates each client holds.
      beta: the trimmed fraction β per side, a Python number in [0, 0.5).

    Returns:
      ``(agg, counts)``, pytrees like params (no client axis): ``agg`` in the deltas'
      dtypes, 0 where ``counts`` is 0; ``counts`` float32, the holders per coordinate.

    Raises:
      ValueError: ``beta`` outside [0, 0.5).
    """
    if not (isinstance(beta, numbers.Real) and 0 <= beta < 0.5):
        raise ValueError(f"trimmed_mean: beta = {beta!r} must be in [0, 0.5)")
    return _trimmed_mean(deltas, masks, float(beta))


@functools.partial(jax.jit, static_argnames="max_norm")
def _norm_bounded(deltas: Params, masks: Params, max_norm: float) -> tuple[Params, Params]:
    x, h = _held(deltas, masks)
    scale = max_norm / jnp.maximum(jnp.sqrt((x ** 2).sum(axis=1)), max_norm)  # ≤ 1
    return _result(_holder_mean(x * scale[:, None], h), h, deltas)


def check_max_norm(max_norm: Any) -> float:
    """``norm_bounded``'s option, checked (a ValueError naming the value).

    Args:
      max_norm: the norm bound.

    Returns:
      ``max_norm`` as a float.

    Raises:
      ValueError: not a finite number > 0.
    """
    if not (isinstance(max_norm, numbers.Real) and 0 < max_norm < math.inf):
        raise ValueError(f"norm_bounded: max_norm = {max_norm!r} must be a finite number > 0")
    return float(max_norm)


def norm_bounded(deltas: Params, masks: Params, *, max_norm: float) -> tuple[Params, Params]:
    """Scale each client's delta to L2 norm ≤ ``max_norm``, then the holder average.

    The norm is over all the coordinates the client holds, across every leaf.

    Args:
      deltas: client deltas (old − new), pytree like params, leading client axis.
      masks: 0/1 pytree like ``deltas``: the coordinates each client holds.
      max_norm: the bound, a finite Python number > 0.

    Returns:
      ``(agg, counts)``, pytrees like params (no client axis): ``agg`` in the deltas'
      dtypes, 0 where ``counts`` is 0; ``counts`` float32, the holders per coordinate.

    Raises:
      ValueError: a bad ``max_norm`` (``check_max_norm``).
    """
    return _norm_bounded(deltas, masks, check_max_norm(max_norm))


def _pairwise_distances(x: jax.Array, h: jax.Array) -> jax.Array:
    """[n, n] mean squared difference over the columns both rows hold; +∞ for pairs
    sharing none and on the diagonal. One row at a time: O(n·P) memory, not O(n²·P)."""
    hf = h.astype(jnp.float32)

    def row(args):
        xi, hi = args
        both = hf * hi
        return (both * (x - xi) ** 2).sum(axis=1), both.sum(axis=1)

    dist, shared = jax.lax.map(row, (x, hf))
    msd = jnp.where(shared > 0, dist / jnp.maximum(shared, 1.0), jnp.inf)
    return jnp.where(jnp.eye(x.shape[0], dtype=bool), jnp.inf, msd)


def _krum_keep(x: jax.Array, h: jax.Array, num_byzantine: int,
               num_selected: int | None) -> jax.Array:
    n = x.shape[0]
    participant = h.any(axis=1)
    k = jnp.maximum(participant.sum() - num_byzantine - 2, 1)
    # m over the participants: p − f (refused clients hold nothing), a given m capped there.
    limit = participant.sum() - num_byzantine
    selected = limit if num_selected is None else jnp.minimum(num_selected, limit)
    nearest = jnp.sort(_pairwise_distances(x, h), axis=1)
    scores = jnp.where(jnp.arange(n) < k, nearest, 0.0).sum(axis=1)
    # Participants first (their scores, even +∞, clipped below a non-participant's +∞),
    # then by score; a stable argsort breaks ties by client index.
    key = jnp.where(participant, jnp.minimum(scores, jnp.finfo(jnp.float32).max), jnp.inf)
    rank = jnp.argsort(jnp.argsort(key))
    return participant & (rank < selected)


def _krum_options(n: int, num_byzantine: int, num_selected: int | None
                  ) -> tuple[int, int | None]:
    """Checked (f, m); m None: p − f, decided per call from the participants."""
    if not (isinstance(num_byzantine, numbers.Integral) and num_byzantine >= 0):
        raise ValueError(f"multi_krum: num_byzantine = {num_byzantine!r} must be an int ≥ 0")
    if n <= 2 * num_byzantine + 2:
        raise ValueError(f"multi_krum: num_byzantine = {num_byzantine} needs more than "
                         f"2·{num_byzantine} + 2 clients; got {n}")
    if num_selected is None:
        return int(num_byzantine), None
    if not (isinstance(num_selected, numbers.Integral)
            and 1 <= num_selected <= n - num_byzantine):
        raise ValueError(f"multi_krum: num_selected = {num_selected!r} must be an int in "
                         f"[1, {n - num_byzantine}] (n_clients − num_byzantine)")
    return int(num_byzantine), int(num_selected)


@functools.partial(jax.jit, static_argnames=("num_byzantine", "num_selected"))
def _krum_select(deltas: Params, masks: Params, num_byzantine: int,
                 num_selected: int | None) -> jax.Array:
    return _krum_keep(*_held(deltas, masks), num_byzantine, num_selected)


def krum_select(deltas: Params, masks: Params, *, num_byzantine: int,
                num_selected: int | None = None) -> jax.Array:
    """The clients multi-Krum keeps (see the module docstring).

    Args:
      deltas: client deltas (old − new), pytree like params, leading client axis.
      masks: 0/1 pytree like ``deltas``: the coordinates each client holds.
      num_byzantine: f, an int ≥ 0 with n_clients > 2f + 2.
      num_selected: m in [1, n_clients − f], capped at p − f (p: the participating
        clients, those holding anything); default p − f.

    Returns:
      bool [n_clients], True for the selected clients.

    Raises:
      ValueError: options out of range.
    """
    f, m = _krum_options(num_clients(deltas, masks), num_byzantine, num_selected)
    return _krum_select(deltas, masks, f, m)


@functools.partial(jax.jit, static_argnames=("num_byzantine", "num_selected"))
def _multi_krum(deltas: Params, masks: Params, num_byzantine: int,
                num_selected: int | None) -> tuple[Params, Params]:
    x, h = _held(deltas, masks)
    h = h & _krum_keep(x, h, num_byzantine, num_selected)[:, None]
    return _result(_holder_mean(x, h), h, deltas)


def multi_krum(deltas: Params, masks: Params, *, num_byzantine: int,
               num_selected: int | None = None) -> tuple[Params, Params]:
    """Holder average over the ``num_selected`` clients with the lowest Krum scores.

    Args:
      deltas: client deltas (old − new), pytree like params, leading client axis.
      masks: 0/1 pytree like ``deltas``: the coordinates each client holds.
      num_byzantine, num_selected: as in ``krum_select``.

    Returns:
      ``(agg, counts)``, pytrees like params (no client axis): ``agg`` in the deltas'
      dtypes, 0 where ``counts`` is 0; ``counts`` float32, the *selected* holders per coordinate.

    Raises:
      ValueError: options out of range.
    """
    f, m = _krum_options(num_clients(deltas, masks), num_byzantine, num_selected)
    return _multi_krum(deltas, masks, f, m)


# ----------------------------------------------------------------------------- by name

AGGREGATORS: dict[str, Aggregator] = {
    "mean": mean,
    "median": median,
    "trimmed_mean": trimmed_mean,
    "norm_bounded": norm_bounded,
    "multi_krum": multi_krum,
}


def rule(name: str, options: dict[str, Any]) -> Aggregator:
    """The rule called ``name``, after checking that ``options`` are the ones it takes.

    Args:
      name: a key of ``AGGREGATORS``.
      options: keyword options for the rule (``check_options``).

    Returns:
      The rule, ``(deltas, masks, **options) -> (agg, counts)``.

    Raises:
      ValueError: an unknown name, or unknown or missing options.
    """
    if name not in AGGREGATORS:
        raise ValueError(f"aggregator = {name!r} is unknown; choose from {sorted(AGGREGATORS)}")
    check_options(name, AGGREGATORS[name], options)
    return AGGREGATORS[name]


def check_options(name: str, rule: Aggregator, options: dict[str, Any]) -> None:
    """Check ``options`` against the keyword-only parameters of ``rule`` (its options):
    unknown keys, missing required ones, and each value's type (``options.check_options``,
    as for a method's options; ranges are the rules' own and ``validate_config``'s).

    Args:
      name: the rule's name; fields are reported as ``server.<name>.<key>``.
      rule: the rule function.
      options: keyword options.

    Raises:
      ValueError: one line naming the first bad key and its value.
    """
    options_lib.check_options(f"server.{name}", rule, options)


def aggregate_deltas(name: str, deltas: Params, masks: Params, *,
                     client_weights: jax.Array | None = None,
                     **options: Any) -> tuple[Params, Params]:
    """``(agg, counts)`` of rule ``name`` (a key of ``AGGREGATORS``) with its ``options``.

    Args:
      name: the rule's name.
      deltas: client deltas (old − new), pytree like params, leading client axis.
      masks: 0/1 pytree like ``deltas``.
      client_weights: optional accept (> 0) / reject (0) per client, shape
        [n_clients], e.g. ``validate_updates(...)[0]``; rejected clients count as
        non-holders.
      **options: the rule's options.

    Returns:
      ``(agg, counts)``, pytrees like params (no client axis): ``agg`` in the deltas'
      dtypes, 0 where ``counts`` is 0; ``counts`` float32, the holders per coordinate.

    Raises:
      ValueError: an unknown rule, bad options, mismatched inputs, or
        ``client_weights`` of the wrong shape.
    """
    combine = rule(name, options)
    n = num_clients(deltas, masks)
    if client_weights is not None:
        if jnp.shape(client_weights) != (n,):
            raise ValueError(f"client_weights has shape {jnp.shape(client_weights)}; "
                             f"expected ({n},), one per client")
        masks = weight_masks(masks, client_weights)
    return combine(deltas, masks, **options)
