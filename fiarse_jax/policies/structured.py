"""Shared pieces of the structured (whole-unit) policies.

A structured client spec is ``{"units": {group: 0/1 [C]}, "rate": r}``: the kept
units of every group declared by the model (``units.UnitGroup``) and the client's
capacity ratio. The sub-model is ``params ⊙ units.expand(...)``; optionally the
hidden layers' outputs are scaled by 1/(kept width) during local training (HeteroFL's
"scaler", folded into the layer's kernel and bias: ReLU(z/w) = ReLU(z)/w).

What a capacity r means (``budget``, every structured builder's option):

* ``"params"`` (default): r is a fraction of *parameters*, as for FIARSE. Level r keeps
  k_g = max(1, ⌈w·C_g⌉) units of every group g for one common width fraction w, chosen
  so that the sub-model holds as close to ⌈r·N⌉ of the N maskable parameters as the
  unit grid allows (a tie → the smaller; ``units.widths_for_budget``). N and the held
  count are over the leaves ``masks.maskable_flags`` marks (the denominator of
  ``run_summary.kept_fractions``; BatchNorm γ/β are not counted). A weight matrix between two
  hidden layers keeps ≈ w² of its entries, so on a deep model w ≈ √r (the paper's sizes
  {1/64, 1/16, 1/4, 1} are the squares of the baselines' width ratios {1/8, 1/4, 1/2,
  1}); on a model with one hidden layer w ≈ r.
* ``"width"``: r is a width ratio: ⌈r·C⌉ units of every group (at least 1), the
  baselines' own papers' meaning, which on a deep model holds ≈ r² of the parameters.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from fiarse_jax.core import units
from fiarse_jax.core.masks import default_maskable, keep_count, maskable_flags, path_names
from fiarse_jax.policies.base import MaskPolicy, select_level


def require_groups(name: str, unit_groups) -> list[units.UnitGroup]:
    if unit_groups is None:
        raise ValueError(f"method {name!r} needs a model that declares its units "
                         "(a `unit_groups(params)` method)")
    return list(unit_groups)


#: What a capacity ratio means for a structured method (see the module docstring); the
#: builders' ``budget`` option is annotated with it (its choices for config checks).
Budget = Literal["params", "width"]
BUDGETS: tuple[str, ...] = get_args(Budget)


def check_budget(budget) -> str:
    """``budget`` if it is one of ``BUDGETS``, else ``ValueError`` naming it."""
    if not isinstance(budget, str) or budget not in BUDGETS:
        raise ValueError(f"budget = {budget!r}: must be one of {list(BUDGETS)} "
                         "('params': a capacity is a fraction of the maskable parameters; "
                         "'width': of every layer's units)")
    return budget


def keep_counts(capacities: Sequence[float], size: int) -> np.ndarray:
    """⌈r·C⌉ per level (at least 1): the ``budget="width"`` counts."""
    return np.array([keep_count(r, size) for r in capacities], np.int32)


def leading_units(groups, capacities) -> dict[str, jnp.ndarray]:
    """[L, C] masks keeping the first ⌈r·C⌉ units of every group (HeteroFL's shape at
    width ratios r, i.e. ``budget="width"``)."""
    return leading_masks(groups, {g.name: keep_counts(capacities, g.size) for g in groups})


def leading_masks(groups, counts: dict) -> dict[str, jnp.ndarray]:
    """[L, C] masks keeping the first ``counts[g][l]`` units of group g at level l."""
    return {g.name: jnp.asarray(np.arange(g.size)[None, :]
                                < np.asarray(counts[g.name])[:, None], jnp.float32)
            for g in groups}


def maskable_shapes(params, is_maskable=None) -> dict[tuple, tuple]:
    """``{path: shape}`` of the maskable leaves (``masks.maskable_flags``); works on
    arrays, tracers and ``ShapeDtypeStruct``s alike."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {path_names(p): tuple(leaf.shape)
            for (p, leaf), f in zip(flat, maskable_flags(params, is_maskable)) if f}


def budget_counts(shapes: dict, groups, capacities) -> dict[str, np.ndarray]:
    """``budget="params"`` counts: {group: [L] kept units}, level r holding the count of
    ``shapes`` scalars closest to ⌈r·N⌉ (N = all of them) at one common width fraction
    (``units.widths_for_budget``)."""
    groups = list(groups)
    n = units.held_count(shapes, groups, {g.name: g.size for g in groups})
    per_level = [units.widths_for_budget(shapes, groups, keep_count(r, n))
                 for r in capacities]
    return {g.name: np.array([w[g.name] for w in per_level], np.int32) for g in groups}


def level_counts(groups, capacities, budget: str = "params", is_maskable=None
                 ) -> Callable[..., dict[str, np.ndarray]]:
    """``counts(params) -> {group: [L] kept units}`` for ``budget`` (see the module
    docstring). Static NumPy: with ``"params"`` the counts depend on the leaf shapes
    only, computed at the first call for a given set of shapes (under ``jit``: at trace
    time) and cached."""
    check_budget(budget)
    groups, capacities = list(groups), tuple(float(c) for c in capacities)
    if budget == "width":
        fixed = {g.name: keep_counts(capacities, g.size) for g in groups}
        return lambda params: fixed
    cache: dict = {}

    def counts(params):
        shapes = maskable_shapes(params, is_maskable)
        key = tuple(sorted(shapes.items()))
        if key not in cache:
            cache[key] = budget_counts(shapes, groups, capacities)
        return cache[key]

    return counts


def structured_policy(name: str, groups: Sequence[units.UnitGroup], capacities,
                      prepare_units: Callable, *, client_spec: Callable | None = None,
                      scale_outputs: bool = False, scale_by: str = "rate") -> MaskPolicy:
    """A ``MaskPolicy`` from a function producing per-level unit masks.

    ``prepare_units(params, round_index, key) -> {group: [L, C]}`` (or, with a custom
    ``client_spec``, any round state that ``client_spec`` turns into a spec).
    ``scale_outputs``: divide every group's producer outputs by ``spec["rate"]``
    (``scale_by="rate"``) or by the group's kept fraction k_g/C_g (``scale_by="width"``,
    the width the layer actually runs at).
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
            rate = (spec["units"][g.name].mean() if scale_by == "width" else spec["rate"])
            for m in g.producers:
                if m.path not in weights:
                    continue
                parent = sub
                for p in m.path[:-1]:
                    parent = parent[p]
                parent[m.path[-1]] = parent[m.path[-1]] / rate.astype(parent[m.path[-1]].dtype)
        return sub

    return MaskPolicy(name=name, prepare=prepare, client_spec=client_spec or select_level,
                      apply=apply, mask=mask)
