"""Shared pieces of the structured (whole-unit) policies.

A structured client spec is ``{"units": {group: 0/1 [C]}, "rate": r}``: the kept
units of every group declared by the model (``units.UnitGroup``) and the client's
capacity ratio. The sub-model is ``params ⊙ units.expand(...)``; optionally the
hidden layers' outputs are scaled by 1/r during local training (HeteroFL's
"scaler", folded into the layer's kernel and bias: ReLU(z/r) = ReLU(z)/r).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fiarse_jax import units
from fiarse_jax.masks import default_maskable, keep_count, path_names
from fiarse_jax.policies.base import MaskPolicy, select_level


def require_groups(name: str, unit_groups) -> list[units.UnitGroup]:
    if unit_groups is None:
        raise ValueError(f"method {name!r} needs a model that declares its units "
                         "(a `unit_groups(params)` method)")
    return list(unit_groups)


def keep_counts(capacities: Sequence[float], size: int) -> np.ndarray:
    """⌈r·C⌉ per level (at least 1)."""
    return np.array([keep_count(r, size) for r in capacities], np.int32)


def leading_units(groups, capacities) -> dict[str, jnp.ndarray]:
    """[L, C] masks keeping the first ⌈r·C⌉ units of every group (HeteroFL's shape)."""
    return {g.name: jnp.asarray(np.arange(g.size)[None, :]
                                < keep_counts(capacities, g.size)[:, None], jnp.float32)
            for g in groups}


def structured_policy(name: str, groups: Sequence[units.UnitGroup], capacities,
                      prepare_units: Callable, *, client_spec: Callable | None = None,
                      scale_outputs: bool = False) -> MaskPolicy:
    """A ``MaskPolicy`` from a function producing per-level unit masks.

    ``prepare_units(params, round_index, key) -> {group: [L, C]}`` (or, with a custom
    ``client_spec``, any round state that ``client_spec`` turns into a spec).
    """
    groups = list(groups)
    rates = jnp.asarray(capacities, jnp.float32)

    def prepare(params, round_index, key):
        return {"units": prepare_units(params, round_index, key), "rate": rates}

    def mask(params, spec):
        return units.expand(params, groups, spec["units"])

    def apply(params, spec):
        sub = jax.tree_util.tree_map(jnp.multiply, params, mask(params, spec))
        if not scale_outputs:
            return sub
        # Producers of hidden units: their layer's output × 1/r. Norm γ/β (the leaves the
        # maskability rule never masks) are skipped: the scaler sits before the norm.
        flat, _ = jax.tree_util.tree_flatten_with_path(params)
        weights = {path_names(p) for (p, _), f in zip(flat, default_maskable(params)) if f}
        for g in groups:
            for m in g.producers:
                if m.path not in weights:
                    continue
                parent = sub
                for p in m.path[:-1]:
                    parent = parent[p]
                parent[m.path[-1]] = parent[m.path[-1]] / spec["rate"].astype(parent[m.path[-1]].dtype)
        return sub

    return MaskPolicy(name=name, prepare=prepare, client_spec=client_spec or select_level,
                      apply=apply, mask=mask)
