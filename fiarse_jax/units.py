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

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fiarse_jax.masks import path_names

Params = Any
UnitMasks = dict


class Member(NamedTuple):
    """One leaf axis indexed by a group's units."""

    path: tuple[str, ...]
    axis: int
    tile: int = 1   # the axis has tile·C entries; entry i belongs to unit i mod C


class UnitGroup(NamedTuple):
    name: str
    size: int
    producers: tuple[Member, ...]   # define each unit (its incoming weights, bias)
    consumers: tuple[Member, ...]   # read each unit (next layer's input axis)

    @property
    def members(self) -> tuple[Member, ...]:
        return self.producers + self.consumers


def leaf(params: Params, path: Sequence[str]):
    """The entry of a nested dict at ``path`` (a tuple of keys)."""
    for p in path:
        params = params[p]
    return params


def chain_groups(params: Params, layers: Sequence[str]) -> list[UnitGroup]:
    """Groups for a plain chain of dense/conv layers ``layers[0] → … → layers[-1]``.

    The output units of every layer but the last form a group; the next layer's
    kernel input axis consumes them (with a channel-last flatten tile when the
    next layer's input is larger, e.g. conv → flatten → dense).
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
    """``groups`` as a list, after checking that every member axis has the group's size
    (tile·C entries); ValueError naming the first leaf that does not."""
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
    """Parameter mask (0/1, like ``params``) from unit masks; leaves outside every group are 1."""
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
    """L2 norm of each unit's producer weights (incoming kernel slice and bias) per group."""
    out = {}
    for g in groups:
        sq = jnp.zeros((g.size,), jnp.float32)
        for m in g.producers:
            x = jnp.moveaxis(leaf(params, m.path).astype(jnp.float32), m.axis, -1)
            sq = sq + (x.reshape(-1, g.size) ** 2).sum(0)
        out[g.name] = jnp.sqrt(sq)
    return out


def unit_fan_in(params: Params, g: UnitGroup) -> int:
    """Number of producer scalars per unit (for comparing norms across layers)."""
    return sum(int(np.prod(leaf(params, m.path).shape)) // g.size for m in g.producers)


def shrink(params: Params, groups: Sequence[UnitGroup], unit_masks: UnitMasks) -> Params:
    """The physically smaller dense sub-model: every member axis keeps only its kept units.

    Host-side (NumPy): kept index sets have data-dependent sizes.
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
    """Number of kept units per group (the widths of the shrunk model)."""
    return {g.name: int(np.asarray(unit_masks[g.name]).sum()) for g in groups}
