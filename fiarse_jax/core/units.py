"""Units (neurons / channels) of a model, for structured sub-model extraction.

Structured methods (HeteroFL, FedRolex, Federated Dropout, neuron-wise FIARSE)
keep or drop whole units. A model declares its units as ``UnitGroup``s: a group
is a set of C units (e.g. the output channels of one conv) and lists every leaf
axis indexed by them — *producers* (the layer's kernel output axis and its bias)
and *consumers* (the next layer's kernel input axis, possibly flattened
channel-last so that entry i belongs to unit i mod C). Dropping unit j zeroes it
in all of them, so a kept input channel of layer l+1 always exists as an output
of layer l. Units not in any group (the image input, the class outputs) are
always kept.

A unit mask is a dict ``{group name: 0/1 vector [C]}``; ``expand`` turns it into
a parameter mask, ``shrink`` into physically smaller dense arrays.
"""
from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fiarse_jax.core.masks import path_names

Params = Any
UnitMasks = dict


class Member(NamedTuple):
    """One leaf axis indexed by a group's units."""

    path: tuple[str, ...]
    axis: int
    tile: int = 1   # the axis has tile·C entries; entry i belongs to unit i mod C


class UnitGroup(NamedTuple):
    """A set of C units and every leaf axis they index.

    Attributes:
      name: the group's name (the key of its unit mask).
      size: C, the number of units.
      producers: members that define each unit (its incoming weights, bias).
      consumers: members that read each unit (the next layer's input axis).
    """

    name: str
    size: int
    producers: tuple[Member, ...]   # define each unit (its incoming weights, bias)
    consumers: tuple[Member, ...]   # read each unit (next layer's input axis)

    @property
    def members(self) -> tuple[Member, ...]:
        """Producers then consumers."""
        return self.producers + self.consumers


def leaf(params: Params, path: Sequence[str]):
    """The entry of a nested dict at ``path`` (a tuple of keys).

    Args:
      params: a nested dict (parameter pytree).
      path: the keys, outermost first.

    Returns:
      The entry (a leaf or a sub-dict).
    """
    for p in path:
        params = params[p]
    return params


def chain_groups(params: Params, layers: Sequence[str]) -> list[UnitGroup]:
    """Groups for a plain chain of dense/conv layers ``layers[0] → … → layers[-1]``.

    The output units of every layer but the last form a group; the next layer's
    kernel input axis consumes them (with a channel-last flatten tile when the
    next layer's input is larger, e.g. conv → flatten → dense).

    Args:
      params: the parameter pytree (nested dicts with ``kernel``, optional ``bias``).
      layers: the top-level module names, input to output.

    Returns:
      One ``UnitGroup`` per layer but the last, named after the layer.

    Raises:
      ValueError: a layer's input axis is not a multiple of the previous layer's units.
    """
    groups = []
    for cur, nxt in zip(layers[:-1], layers[1:]):
        k = leaf(params, (cur, "kernel"))
        c = k.shape[-1]
        producers = [Member((cur, "kernel"), k.ndim - 1)]
        if "bias" in leaf(params, (cur,)):
            producers.append(Member((cur, "bias"), 0))
        nk = leaf(params, (nxt, "kernel"))
        fan_in = nk.shape[-2]
        if fan_in % c:
            raise ValueError(f"{nxt}.kernel input axis {fan_in} is not a multiple of "
                             f"{cur}'s {c} output units")
        groups.append(UnitGroup(name=cur, size=c, producers=tuple(producers),
                                consumers=(Member((nxt, "kernel"), nk.ndim - 2, fan_in // c),)))
    return groups


def check_groups(params: Params, groups: Sequence[UnitGroup]) -> list[UnitGroup]:
    """``groups`` as a list, after checking that every member axis has the group's size.

    Args:
      params: the parameter pytree.
      groups: the unit groups.

    Returns:
      ``list(groups)``.

    Raises:
      ValueError: naming the first leaf whose axis does not have tile·C entries.
    """
    for g in groups:
        for m in g.members:
            n = leaf(params, m.path).shape[m.axis]
            if n != g.size * m.tile:
                raise ValueError(f"{'/'.join(m.path)} axis {m.axis} has {n} entries; "
                                 f"group {g.name} has {g.size} units")
    return list(groups)


def _axis_mask(u: jax.Array, m: Member, ndim: int) -> jax.Array:
    v = jnp.tile(u, m.tile) if m.tile > 1 else u
    shape = [1] * ndim
    shape[m.axis] = v.shape[0]
    return v.reshape(shape)


def expand(params: Params, groups: Sequence[UnitGroup], unit_masks: UnitMasks) -> Params:
    """Parameter mask (0/1, like ``params``) from unit masks; leaves outside every group are 1.

    Args:
      params: the parameter pytree.
      groups: the unit groups.
      unit_masks: ``{group name: 0/1 vector [C]}``.

    Returns:
      A pytree like ``params``, in each leaf's dtype.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    index = {path_names(p): i for i, (p, _) in enumerate(flat)}
    out = [jnp.ones_like(leaf) for _, leaf in flat]
    for g in groups:
        u = unit_masks[g.name]
        for m in g.members:
            i = index[m.path]
            out[i] = out[i] * _axis_mask(u, m, out[i].ndim).astype(out[i].dtype)
    return jax.tree_util.tree_unflatten(treedef, out)


def unit_norms(params: Params, groups: Sequence[UnitGroup]) -> dict[str, jax.Array]:
    """L2 norm of each unit's producer weights (incoming kernel slice and bias) per group.

    Args:
      params: the parameter pytree.
      groups: the unit groups.

    Returns:
      ``{group name: float32 [C]}``.
    """
    out = {}
    for g in groups:
        sq = jnp.zeros((g.size,), jnp.float32)
        for m in g.producers:
            x = jnp.moveaxis(leaf(params, m.path).astype(jnp.float32), m.axis, -1)
            sq = sq + (x.reshape(-1, g.size) ** 2).sum(0)
        out[g.name] = jnp.sqrt(sq)
    return out


def unit_fan_in(params: Params, g: UnitGroup) -> int:
    """Number of producer scalars per unit (for comparing norms across layers).

    Args:
      params: the parameter pytree.
      g: the unit group.

    Returns:
      The count, an int.
    """
    return sum(int(np.prod(leaf(params, m.path).shape)) // g.size for m in g.producers)


def shrink(params: Params, groups: Sequence[UnitGroup], unit_masks: UnitMasks) -> Params:
    """The physically smaller dense sub-model: every member axis keeps only its kept units.

    Host-side (NumPy): kept index sets have data-dependent sizes.

    Args:
      params: the parameter pytree (nested dicts).
      groups: the unit groups.
      unit_masks: ``{group name: 0/1 vector [C]}``.

    Returns:
      A pytree like ``params`` of NumPy arrays, member axes shrunk to the kept units.
    """
    out = jax.tree_util.tree_map(np.asarray, params)
    for g in groups:
        keep = np.flatnonzero(np.asarray(unit_masks[g.name]) > 0)
        for m in g.members:
            idx = (np.arange(m.tile)[:, None] * g.size + keep[None, :]).ravel()
            parent = leaf(out, m.path[:-1])
            parent[m.path[-1]] = np.take(parent[m.path[-1]], idx, axis=m.axis)
    return out


def kept_sizes(groups: Sequence[UnitGroup], unit_masks: UnitMasks) -> dict[str, int]:
    """Number of kept units per group (the widths of the shrunk model).

    Args:
      groups: the unit groups.
      unit_masks: ``{group name: 0/1 vector [C]}``.

    Returns:
      ``{group name: int}``.
    """
    return {g.name: int(np.asarray(unit_masks[g.name]).sum()) for g in groups}


# ---- Parameter budgets: unit widths whose sub-model holds a given number of scalars ----

def count_terms(shapes: dict, groups: Sequence[UnitGroup]) -> list[tuple[int, tuple]]:
    """Per counted leaf, its unindexed size and the groups indexing its other axes.

    A leaf touched by several groups (producer of one, consumer of another) gets one
    factor each.

    Args:
      shapes: ``{path tuple: shape}`` of the leaves that count (e.g. the maskable
        ones, ``structured.maskable_shapes``); members on other leaves are ignored.
      groups: the model's unit groups.

    Returns:
      One ``(rest, ((group, tile), ...))`` per entry of ``shapes``: ``rest`` the
      product of its axes that no group indexes, then the groups (with tiles)
      indexing the others.
    """
    axes: dict[tuple, list] = {}
    for g in groups:
        for m in g.members:
            axes.setdefault(m.path, []).append((m.axis, m.tile, g.name))
    terms = []
    for path, shape in shapes.items():
        shape = list(shape)
        factors = []
        for axis, tile, name in axes.get(path, ()):
            shape[axis] = 1
            factors.append((name, tile))
        terms.append((int(np.prod(shape)), tuple(factors)))
    return terms


def held_count(shapes: dict, groups: Sequence[UnitGroup], kept: dict):
    """Scalars of the ``shapes`` leaves a structured sub-model holds when group g keeps ``kept[g]`` units.

    Σ over leaves of ``rest · Π (tile·kept[g])`` (what ``expand(...)`` sums to on those
    leaves).

    Args:
      shapes: ``{path tuple: shape}`` of the leaves that count (e.g. the maskable
        ones, ``structured.maskable_shapes``); members on other leaves are ignored.
      groups: the model's unit groups.
      kept: ``{group name: count}``; ints, or arrays of counts (broadcast: one held
        count per entry, e.g. per candidate prefix under ``jit``).

    Returns:
      An exact Python int for int ``kept``, else an array of held counts.
    """
    total = 0
    for rest, factors in count_terms(shapes, groups):
        term = rest
        for name, tile in factors:
            term = term * (tile * kept[name])
        total = total + term
    return total


def widths_for_budget(shapes: dict, groups: Sequence[UnitGroup], budget: int, *,
                      fixed: dict | None = None) -> dict[str, int]:
    """Kept units per group for one common width fraction w whose sub-model is closest to ``budget``.

    The sub-model holds a count of ``shapes`` scalars (``held_count``) as close to
    ``budget`` as the unit grid allows (a tie goes to the smaller count). Every group g
    not in ``fixed`` keeps k_g(w) = max(1, ⌈w·C_g⌉) units. w runs over the candidates
    {j / C_g} (the points where some k_g changes, so every reachable width vector is
    tried); the held count is nondecreasing in w, so a bisection finds the largest
    candidate at or below the budget and the answer is it or the next one. Exact
    rational arithmetic (no float ties).

    Args:
      shapes: ``{path tuple: shape}`` of the leaves that count (e.g. the maskable
        ones, ``structured.maskable_shapes``); members on other leaves are ignored.
      groups: the model's unit groups.
      budget: the target number of scalars.
      fixed: ``{group name: count}`` for groups that keep a given count (e.g. 0
        beyond a ScaleFL depth).

    Returns:
      ``{group name: kept units}`` for every group (``fixed`` ones as given).
    """
    fixed = dict(fixed or {})
    free = [g for g in groups if g.name not in fixed]
    if not free:
        return fixed
    candidates = sorted({Fraction(j, g.size) for g in free for j in range(1, g.size + 1)})

    def widths(w: Fraction) -> dict[str, int]:
        out = {g.name: max(1, -((-w.numerator * g.size) // w.denominator)) for g in free}
        out.update(fixed)
        return out

    def held(i: int) -> int:
        return held_count(shapes, groups, widths(candidates[i]))

    lo, hi, below = 0, len(candidates) - 1, -1
    while lo <= hi:                       # the largest candidate with held ≤ budget
        mid = (lo + hi) // 2
        if held(mid) <= budget:
            below, lo = mid, mid + 1
        else:
            hi = mid - 1
    if below < 0:
        return widths(candidates[0])
    if below + 1 < len(candidates) and held(below + 1) - budget < budget - held(below):
        return widths(candidates[below + 1])
    return widths(candidates[below])
