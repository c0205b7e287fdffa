"""FedRolex (Alam et al., NeurIPS 2022): a rolling window of channels.

In round t a client of capacity r keeps units {(t + i) mod C : i < k_g} of every hidden
layer / group g, i.e. ``roll(arange(C), -(t mod C))[:k_g]``: the window moves by one
unit per round and wraps around, so every unit is trained by small clients in turn.

k_g comes from the capacity's parameter budget (``budget="params"``, the default: a
capacity is a fraction of the maskable parameters, as for FIARSE; k_g = max(1, ⌈w·C_g⌉)
at the common width w whose sub-model holds ≈ ⌈r·N⌉ of them, w ≈ √r on a deep model,
see ``policies.structured``), or k_g = ⌈r·C_g⌉ with ``budget="width"`` (FedRolex's own
width ratios, ≈ r² of the parameters on a deep model).
"""
from __future__ import annotations

import jax.numpy as jnp

from fiarse_jax.policies.structured import Budget, level_counts, require_groups, structured_policy


def fedrolex_policy(capacities, *, unit_groups=None, budget: Budget = "params",
                    is_maskable=None):
    """``budget``: ``"params"`` | ``"width"`` (module docstring)."""
    groups = require_groups("fedrolex", unit_groups)
    counts = level_counts(groups, capacities, budget, is_maskable)

    def prepare_units(params, round_index, key):
        del key
        ks = counts(params)
        out = {}
        for g in groups:
            offset = (jnp.arange(g.size) - round_index) % g.size   # position in the window
            out[g.name] = (offset[None, :] < jnp.asarray(ks[g.name])[:, None]).astype(jnp.float32)
        return out

    return structured_policy("fedrolex", groups, capacities, prepare_units)
