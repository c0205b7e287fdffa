"""Neuron-wise FIARSE: importance-aware extraction of whole units.

Importance of a unit = the L2 norm of its incoming weights and bias (the slice of
its layer's kernel along the output axis, plus its bias entry). The mask is fixed for
the round (structured: plain masked gradient) and recomputed from the global model
every round.

A capacity r is a fraction of *parameters* (``budget="params"``, the default, as for
parameter-wise FIARSE): level r holds ≈ ⌈r·N⌉ of the N maskable parameters
(``masks.maskable_flags``).

* Scope ``layer`` keeps the k_g most important units of every hidden layer / group g,
  with k_g = max(1, ⌈w·C_g⌉) the parameter-budget widths HeteroFL uses (one common
  width fraction w, w ≈ √r on a deep model; see ``policies.structured``).
* Scope ``global`` ranks all hidden units together by the RMS of those weights
  (norm / √fan-in, so layers of different fan-in compare) and keeps the top p of
  them, at least one per layer (each layer's best), with p the prefix length whose
  sub-model's held count (``units.held_count``: a kernel between two groups holds
  k₁·k₂·rest) is closest to ⌈r·N⌉ (a tie → the smaller). The held count is
  nondecreasing in p, so p is a ``searchsorted`` on the counts of all prefixes
  (computed under ``jit``).

``budget="width"`` restores the width-ratio meaning: ``layer`` keeps ⌈r·C⌉ units of
every layer, ``global`` the top ⌈r·U⌉ of the U units (≈ r² of the parameters on a
deep model).

Trade-off against parameter-wise FIARSE: the sub-model is a physically smaller
dense network (real FLOP and memory savings on any hardware), but a kept unit
keeps all its weights, important or not, so at equal parameter budget it holds
fewer of the largest-magnitude weights.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from fiarse_jax.core import units
from fiarse_jax.core.masks import _check_scope, keep_count
from fiarse_jax.policies.base import Scope
from fiarse_jax.policies.structured import (
    Budget,
    level_counts,
    maskable_shapes,
    require_groups,
    structured_policy,
)


def fiarse_neuron_policy(capacities, *, unit_groups=None, scope: Scope = "layer",
                         budget: Budget = "params", is_maskable=None):
    """``scope``: ``"layer"`` | ``"global"``; ``budget``: ``"params"`` | ``"width"``
    (module docstring)."""
    groups = require_groups("fiarse_neuron", unit_groups)
    _check_scope(scope)
    caps = tuple(float(c) for c in capacities)
    counts = level_counts(groups, caps, budget, is_maskable)

    def global_prefixes(params, allv):
        """Per level, the index into the descending order of ``allv`` of the last unit
        kept (the ``budget="params"`` prefix rule)."""
        shapes = maskable_shapes(params, is_maskable)
        n = units.held_count(shapes, groups, {g.name: g.size for g in groups})
        gid = np.concatenate([np.full(g.size, i) for i, g in enumerate(groups)])
        order = jnp.argsort(-allv)
        onehot = (jnp.asarray(gid)[order][:, None] == jnp.arange(len(groups))[None, :])
        kept = jnp.maximum(jnp.cumsum(onehot.astype(jnp.int32), 0), 1)    # [U, G]
        held = units.held_count(shapes, groups,
                                {g.name: kept[:, i] for i, g in enumerate(groups)})  # [U]
        out = []
        for r in caps:
            b = keep_count(r, n)
            hi = jnp.minimum(jnp.searchsorted(held, b, side="left"), held.shape[0] - 1)
            lo = jnp.maximum(hi - 1, 0)
            out.append(jnp.where(jnp.abs(held[lo] - b) <= jnp.abs(held[hi] - b), lo, hi))
        return out

    def prepare_units(params, round_index, key):
        del round_index, key
        norms = units.unit_norms(params, groups)
        if scope == "layer":
            ks = counts(params)
            out = {}
            for g in groups:
                desc = jnp.sort(norms[g.name])[::-1]
                theta = jnp.stack([desc[int(k) - 1] for k in ks[g.name]])
                out[g.name] = (norms[g.name][None, :] >= theta[:, None]).astype(jnp.float32)
            return out
        rms = {g.name: norms[g.name] / math.sqrt(units.unit_fan_in(params, g)) for g in groups}
        allv = jnp.concatenate([rms[g.name] for g in groups])
        desc = jnp.sort(allv)[::-1]
        if budget == "params":
            theta = jnp.stack([desc[p] for p in global_prefixes(params, allv)])
        else:
            theta = jnp.stack([desc[keep_count(r, allv.shape[0]) - 1] for r in caps])
        out = {}
        for g in groups:
            keep = rms[g.name][None, :] >= theta[:, None]
            best = jnp.arange(g.size) == jnp.argmax(rms[g.name])   # never empty a layer
            out[g.name] = (keep | best[None, :]).astype(jnp.float32)
        return out

    return structured_policy("fiarse_neuron", groups, caps, prepare_units)
