"""FedAvg reference points for capacity heterogeneity.

``fedavg_full``: every client trains the whole model, ignoring its capacity (an
upper bound no real constrained client could run); every capacity's "sub-model"
is the full model. ``fedavg_smallest``: every client trains the smallest
capacity's model (HeteroFL's leading units at min(r), no scaler), so all clients
can run it; every capacity is evaluated with that smallest model. Its size follows
HeteroFL's rule: by default (``budget="params"``) it holds ≈ ⌈min(r)·N⌉ of the N
maskable parameters (one common width w ≈ √min(r) on a deep model, see
``policies.structured``); ``budget="width"`` keeps ⌈min(r)·C⌉ units of every layer.
"""
from __future__ import annotations

import jax.numpy as jnp

from fiarse_jax.policies.structured import (
    Budget,
    leading_masks,
    level_counts,
    require_groups,
    structured_policy,
)


def fedavg_full_policy(capacities, *, unit_groups=None):
    groups = list(unit_groups or [])
    ones = {g.name: jnp.ones((len(capacities), g.size), jnp.float32) for g in groups}
    return structured_policy("fedavg_full", groups, capacities, lambda p, r, k: ones)


def fedavg_smallest_policy(capacities, *, unit_groups=None, budget: Budget = "params",
                           is_maskable=None):
    """``budget``: ``"params"`` | ``"width"`` (module docstring)."""
    groups = require_groups("fedavg_smallest", unit_groups)
    counts = level_counts(groups, [min(capacities)], budget, is_maskable)

    def prepare_units(params, round_index, key):
        smallest = leading_masks(groups, counts(params))
        return {name: jnp.repeat(m, len(capacities), axis=0) for name, m in smallest.items()}

    return structured_policy("fedavg_smallest", groups, [min(capacities)] * len(capacities),
                             prepare_units)
