"""FedRolex (Alam et al., NeurIPS 2022): a rolling window of channels.

In round t a client of ratio r keeps units {(t + i) mod C : i < ⌈r·C⌉} of every
hidden layer, i.e. ``roll(arange(C), -(t mod C))[:⌈r·C⌉]``: the window moves by one
unit per round and wraps around, so every unit is trained by small clients in turn.
"""
from __future__ import annotations

import jax.numpy as jnp

from fiarse_jax.policies.structured import keep_counts, require_groups, structured_policy


def fedrolex_policy(capacities, *, unit_groups=None):
    groups = require_groups("fedrolex", unit_groups)
    ks = {g.name: jnp.asarray(keep_counts(capacities, g.size)) for g in groups}

    def prepare_units(params, round_index, key):
        del params, key
        out = {}
        for g in groups:
            offset = (jnp.arange(g.size) - round_index) % g.size   # position in the window
            out[g.name] = (offset[None, :] < ks[g.name][:, None]).astype(jnp.float32)
        return out

    return structured_policy("fedrolex", groups, capacities, prepare_units)
