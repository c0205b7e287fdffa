"""Federated Dropout (Caldas et al., 2018): a fresh random subset of units.

Each client, each round, keeps k_g units of every hidden layer / group g drawn uniformly
without replacement from its own key (a function of seed, round and client id).
Evaluation uses one fixed draw per capacity (the run's evaluation key, ``rng.eval_key``).

k_g comes from the capacity's parameter budget (``budget="params"``, the default: a
capacity is a fraction of the maskable parameters, as for FIARSE; k_g = max(1, ⌈w·C_g⌉)
at the common width w whose sub-model holds ≈ ⌈r·N⌉ of them, w ≈ √r on a deep model,
see ``policies.structured``), or k_g = ⌈r·C_g⌉ with ``budget="width"`` (a keep rate
per layer, ≈ r² of the parameters on a deep model). The held count does not depend on
which units are drawn, only on how many.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fiarse_jax.policies.structured import Budget, level_counts, require_groups, structured_policy


def fed_dropout_policy(capacities, *, unit_groups=None, budget: Budget = "params",
                       is_maskable=None):
    """``budget``: ``"params"`` | ``"width"`` (module docstring)."""
    groups = require_groups("fed_dropout", unit_groups)
    counts = level_counts(groups, capacities, budget, is_maskable)

    def client_spec(state, level, key):
        out = {}
        for i, g in enumerate(groups):
            scores = jax.random.uniform(jax.random.fold_in(key, i), (g.size,))
            rank = jnp.argsort(jnp.argsort(scores))
            out[g.name] = (rank < state["units"][g.name][level]).astype(jnp.float32)
        return {"units": out, "rate": state["rate"][level]}

    return structured_policy(
        "fed_dropout", groups, capacities,
        lambda p, r, k: {n: jnp.asarray(v) for n, v in counts(p).items()},
        client_spec=client_spec)
