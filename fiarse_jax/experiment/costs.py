"""What each capacity's sub-model costs a client: parameters, FLOPs, bytes per round.

For every level:
* ``maskable_kept`` / ``maskable_fraction``: maskable scalars in the sub-model.
* ``params_held``: scalars the client must hold (kept maskable + every
  non-maskable leaf); for a structured mask this is the shrunk dense model's size.
* ``flops`` with ``flops_basis``: XLA's cost analysis of one forward pass on one
  sample, ``jax.jit(apply).lower(...).compile().cost_analysis()["flops"]``.
  Structured masks (whole units) are measured on the *physically shrunk dense*
  sub-model; unstructured masks (parameter-wise FIARSE) on the *masked dense* model,
  which XLA runs at full dense cost: sparsity saves no FLOPs there. A depth-reduced
  sub-model (spec with a ``depth``, scalefl) is shrunk to its first d blocks (MLP
  hidden layers, ResNet stages) and read out through exit d, which becomes the shrunk
  model's output layer (``model.with_depth``/``depth_params``); FLOPs are that one
  readout path (a client's training pass also runs its shallower exit heads).
* ``bytes_down`` / ``bytes_up``: one transfer of the sub-model (down) and of its
  delta (up, same support). Structured: dense values. Unstructured: values plus an
  int32 index per kept maskable scalar, or the dense model if that is smaller.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from fiarse_jax.core import units
from fiarse_jax.core.capacities import capacity_label
from fiarse_jax.core.masks import maskable_flags
from fiarse_jax.policies.base import MaskPolicy


def forward_flops(model, params, x_one: jax.Array) -> float:
    """XLA-counted FLOPs of ``model.apply`` on one sample."""
    compiled = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, x_one).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):   # older jax: one dict per computation
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def shrunk_submodel(model, params, spec, unit_groups):
    """(smaller model, its dense parameters) for a structured ``spec``: every group at its
    kept width (``units.shrink``); with a ``depth`` in the spec (early exits, scalefl) only
    the first d blocks (hidden layers / stages), read out through exit d
    (``model.with_depth``/``depth_params``, which any model with exits provides)."""
    u = {k: np.asarray(v) for k, v in spec["units"].items()}
    small = model.with_widths(units.kept_sizes(unit_groups, u))
    shrunk = units.shrink(params, unit_groups, u)
    if isinstance(spec, dict) and "depth" in spec:
        d = int(spec["depth"])
        small, shrunk = small.with_depth(d), small.depth_params(shrunk, d)
    return small, shrunk


def capacity_costs(model, params, policy: MaskPolicy, round_state: Any,
                   capacities: Sequence[float], *, structured: bool,
                   unit_groups=None, x_one: jax.Array,
                   is_maskable=None, key: jax.Array | None = None) -> dict[str, dict]:
    """Cost figures per capacity label (see module docstring); ``is_maskable`` is the
    model's own maskability rule, if it declares one (default: ``masks.default_maskable``);
    ``key``: a random policy's draw (the run's evaluation key; default ``PRNGKey(0)``)."""
    key = jax.random.PRNGKey(0) if key is None else key
    flags = maskable_flags(params, is_maskable)
    leaves = jax.tree_util.tree_leaves(params)
    itemsize = [np.dtype(l.dtype).itemsize for l in leaves]
    n_total = sum(l.size for l in leaves)
    n_maskable = sum(l.size for l, f in zip(leaves, flags) if f)
    dense_bytes = sum(l.size * s for l, s in zip(leaves, itemsize))
    full_flops = forward_flops(model, params, x_one)
    out = {}
    for lvl, r in enumerate(capacities):
        spec = policy.client_spec(round_state, lvl, key)
        m = [np.asarray(x) for x in jax.tree_util.tree_leaves(policy.mask(params, spec))]
        kept = [int(x.sum()) for x in m]
        maskable_kept = sum(k for k, f in zip(kept, flags) if f)
        held = sum(k if f else l.size for k, f, l in zip(kept, flags, leaves))
        if structured and unit_groups is not None:
            small, shrunk = shrunk_submodel(model, params, spec, unit_groups)
            flops, basis = forward_flops(small, shrunk, x_one), "shrunk dense"
            held = sum(v.size for v in jax.tree_util.tree_leaves(shrunk))
            nbytes = sum(v.size * np.dtype(v.dtype).itemsize for v in jax.tree_util.tree_leaves(shrunk))
        else:
            flops, basis = full_flops, "masked dense"
            sparse = sum((k * (s + 4)) if f else l.size * s
                         for k, f, l, s in zip(kept, flags, leaves, itemsize))
            nbytes = min(sparse, dense_bytes)
        out[capacity_label(r)] = {
            "capacity": float(r),
            "maskable_kept": int(maskable_kept),
            "maskable_fraction": maskable_kept / n_maskable,
            "params_held": int(held),
            "params_total": int(n_total),
            "flops": flops,
            "flops_full": full_flops,
            "flops_basis": basis,
            "bytes_down": int(nbytes),
            "bytes_up": int(nbytes),
        }
    return out
