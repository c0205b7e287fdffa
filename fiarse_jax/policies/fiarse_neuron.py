"""Neuron-wise FIARSE: importance-aware extraction of whole units.

Importance of a unit = the L2 norm of its incoming weights and bias (the slice of
its layer's kernel along the output axis, plus its bias entry). Scope ``layer``
keeps the ⌈r·C⌉ most important units of every hidden layer; scope ``global``
ranks all hidden units together by the RMS of those weights (norm / √fan-in, so
layers of different fan-in compare) and keeps the top ⌈r·U⌉ of the U units, at
least one per layer. The mask is fixed for the round (structured: plain masked
gradient) and recomputed from the global model every round.

Trade-off against parameter-wise FIARSE: the sub-model is a physically smaller
dense network (real FLOP and memory savings on any hardware), but a kept unit
keeps all its weights, important or not, so at equal parameter budget it holds
fewer of the largest-magnitude weights.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from fiarse_jax import units
from fiarse_jax.masks import _check_scope, keep_count
from fiarse_jax.policies.structured import keep_counts, require_groups, structured_policy


def fiarse_neuron_policy(capacities, *, unit_groups=None, scope: str = "layer"):
    groups = require_groups("fiarse_neuron", unit_groups)
    _check_scope(scope)
    caps = tuple(float(c) for c in capacities)

    def top(scores: jnp.ndarray, k: int) -> jnp.ndarray:
        return jnp.sort(scores)[::-1][k - 1]

    def prepare_units(params, round_index, key):
        del round_index, key
        norms = units.unit_norms(params, groups)
        if scope == "layer":
            out = {}
            for g in groups:
                ks = keep_counts(caps, g.size)
                desc = jnp.sort(norms[g.name])[::-1]
                theta = jnp.stack([desc[k - 1] for k in ks])
                out[g.name] = (norms[g.name][None, :] >= theta[:, None]).astype(jnp.float32)
            return out
        rms = {g.name: norms[g.name] / math.sqrt(units.unit_fan_in(params, g)) for g in groups}
        allv = jnp.concatenate([rms[g.name] for g in groups])
        desc = jnp.sort(allv)[::-1]
        theta = jnp.stack([desc[keep_count(r, allv.shape[0]) - 1] for r in caps])
        out = {}
        for g in groups:
            keep = rms[g.name][None, :] >= theta[:, None]
            best = jnp.arange(g.size) == jnp.argmax(rms[g.name])   # never empty a layer
            out[g.name] = (keep | best[None, :]).astype(jnp.float32)
        return out

    return structured_policy("fiarse_neuron", groups, caps, prepare_units)
