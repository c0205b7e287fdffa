"""FedAvg reference points for capacity heterogeneity.

``fedavg_full``: every client trains the whole model, ignoring its capacity (an
upper bound no real constrained client could run); every capacity's "sub-model"
is the full model. ``fedavg_smallest``: every client trains the smallest
capacity's model (HeteroFL's leading units at min(r), no scaler), so all clients
can run it; every capacity is evaluated with that smallest model.
"""
from __future__ import annotations

import jax.numpy as jnp

from fiarse_jax.policies.structured import leading_units, require_groups, structured_policy


def fedavg_full_policy(capacities, *, unit_groups=None):
    groups = list(unit_groups or [])
    ones = {g.name: jnp.ones((len(capacities), g.size), jnp.float32) for g in groups}
    return structured_policy("fedavg_full", groups, capacities, lambda p, r, k: ones)


def fedavg_smallest_policy(capacities, *, unit_groups=None):
    groups = require_groups("fedavg_smallest", unit_groups)
    smallest = leading_units(groups, [min(capacities)])
    fixed = {name: jnp.repeat(m, len(capacities), axis=0) for name, m in smallest.items()}
    return structured_policy("fedavg_smallest", groups, [min(capacities)] * len(capacities),
                             lambda p, r, k: fixed)
