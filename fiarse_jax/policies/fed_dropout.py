"""Federated Dropout (Caldas et al., 2018): a fresh random subset of units.

Each client, each round, keeps ⌈r·C⌉ units of every hidden layer drawn uniformly
without replacement from its own key (a function of seed, round and client id).
Evaluation uses one fixed draw (key 0) per capacity.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fiarse_jax.policies.structured import keep_counts, require_groups, structured_policy


def fed_dropout_policy(capacities, *, unit_groups=None):
    groups = require_groups("fed_dropout", unit_groups)
    ks = {g.name: jnp.asarray(keep_counts(capacities, g.size)) for g in groups}

    def client_spec(state, level, key):
        out = {}
        for i, g in enumerate(groups):
            scores = jax.random.uniform(jax.random.fold_in(key, i), (g.size,))
            rank = jnp.argsort(jnp.argsort(scores))
            out[g.name] = (rank < state["units"][g.name][level]).astype(jnp.float32)
        return {"units": out, "rate": state["rate"][level]}

    return structured_policy("fed_dropout", groups, capacities, lambda p, r, k: ks,
                             client_spec=client_spec)
