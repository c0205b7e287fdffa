"""ScaleFL/DepthFL-style baseline (simplified): width and depth shrink together, early
exits, self-distillation from the deepest kept exit. See ``docs/scalefl.md``.

The model is an MLP with early exits (``MLP(early_exits=True)``, L ≥ 2 hidden layers):
exit e (0-based) reads hidden layer e; exits 0 … L−2 are the heads ``Exit_e`` and exit
L−1 is the output layer. A client of capacity r holds

* depth d_r = ⌈r^a · L⌉ (1 ≤ d_r ≤ L, a = ``depth_exponent``): hidden layers 0 … d_r−1
  and their exits 0 … d_r−1; deeper layers, their exits and (when d_r < L) the output
  layer are not held;
* width: the leading ⌈w_r·C⌉ units of every kept hidden layer (HeteroFL's shape), with
  w_r the largest ratio for which the sub-model's parameter count (kept layers and kept
  exits, what the client stores) is ≤ r·N, N = every parameter of the global model
  (at least one unit per kept layer). So level r holds ≈ r·N parameters, like FIARSE.

Client spec (identical structure for every level, vmappable)::

    {"units": {group: 0/1 [C]}, "rate": r, "depth": d_r (int32),
     "exit_weights": 0/1 [E] (exit e held iff e < d_r)}

``objective``: cross-entropy averaged over the kept exits, plus ``kd_weight`` × the mean
over the kept exits except the deepest of T²·KL(softmax(z_deep/T) ‖ softmax(z_e/T)),
the teacher z_deep under ``stop_gradient`` (T = ``temperature``). ``readout``: the
deepest kept exit's logits (no ensembling).

Widths are derived from the global model's leaf shapes (static under ``jit``) at the
first ``prepare`` and cached; the builder only needs the model's unit groups.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fiarse_jax import units
from fiarse_jax.masks import keep_count, path_names
from fiarse_jax.policies.base import MaskPolicy, select_level

NEEDS = ("method 'scalefl' needs an MLP with early-exit heads and at least 2 hidden "
         "layers (config.model.name = 'mlp', config.model.early_exits = True, "
         "len(config.model.hidden_sizes) >= 2)")


def exit_layout(unit_groups) -> tuple[list[str], list[str]]:
    """(hidden modules, exit modules), shallowest first, from the model's unit groups.

    Group i's producer is hidden layer i; its exit is the one consumer that produces no
    group (``Exit_i``, or the output layer for the last group). Raises ``ValueError``
    for a model without exits or with fewer than 2 hidden layers.
    """
    if unit_groups is None:
        raise ValueError(NEEDS + "; this model declares no unit groups")
    groups = list(unit_groups)
    hidden = [g.producers[0].path[0] for g in groups]
    if len(hidden) < 2:
        raise ValueError(NEEDS + f"; this model has {len(hidden)} hidden layer(s)")
    exits = []
    for i, g in enumerate(groups):
        reads = {m.path[0] for m in g.consumers}
        heads = sorted(reads - set(hidden))
        nxt = hidden[i + 1] if i + 1 < len(hidden) else None
        if len(heads) != 1 or (nxt is not None and nxt not in reads):
            raise ValueError(NEEDS + f"; layer {hidden[i]!r} feeds {sorted(reads)} "
                             "(expected the next layer and one exit head)")
        exits.append(heads[0])
    return hidden, exits


def depth_for(r: float, num_layers: int, depth_exponent: float) -> int:
    """d_r = ⌈r^a · L⌉, at least 1."""
    return keep_count(float(r) ** depth_exponent, num_layers)


def held_count(shapes: dict, groups, hidden: Sequence[str], exits: Sequence[str],
               depth: int, kept: dict[str, int]) -> int:
    """Scalars a client holds: leaves of kept modules, every group axis at its kept width.

    ``shapes``: {path tuple: shape}; ``kept``: {group: kept units}.
    """
    dropped = set(hidden[depth:]) | set(exits[depth:])
    axes: dict[tuple, list] = {}
    for g in groups:
        for m in g.members:
            axes.setdefault(m.path, []).append((m.axis, m.tile, g.name))
    total = 0
    for path, shape in shapes.items():
        if path[0] in dropped:
            continue
        shape = list(shape)
        for axis, tile, name in axes.get(path, ()):
            shape[axis] = tile * kept[name]
        total += int(np.prod(shape))
    return total


def level_widths(shapes: dict, groups, hidden, exits, r: float, depth: int) -> dict[str, int]:
    """Kept units per group: leading ⌈w·C⌉ of the first ``depth`` layers, 0 beyond, with
    w the largest ratio whose held count is ≤ r·N (the smallest candidate if none is)."""
    n_total = sum(int(np.prod(s)) for s in shapes.values())
    budget = r * n_total * (1 + 1e-9)
    sizes = [g.size for g in groups]
    candidates = sorted({k / c for c in sizes[:depth] for k in range(1, c + 1)})

    def widths(w):
        return {g.name: (keep_count(w, g.size) if i < depth else 0) for i, g in enumerate(groups)}

    best = widths(candidates[0])
    lo, hi = 0, len(candidates) - 1
    while lo <= hi:   # held count is monotone in w
        mid = (lo + hi) // 2
        k = widths(candidates[mid])
        if held_count(shapes, groups, hidden, exits, depth, k) <= budget:
            best, lo = k, mid + 1
        else:
            hi = mid - 1
    return best


def check_options(depth_exponent: float = 0.5, kd_weight: float = 1.0,
                  temperature: float = 3.0) -> None:
    """Raise ``ValueError`` naming the first bad option (``depth_exponent``, ``kd_weight``
    finite ≥ 0; ``temperature`` finite > 0)."""
    for name, v, ok in (("depth_exponent", depth_exponent, lambda x: 0 <= x < math.inf),
                        ("kd_weight", kd_weight, lambda x: 0 <= x < math.inf),
                        ("temperature", temperature, lambda x: 0 < x < math.inf)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(float(v)):
            raise ValueError(f"{name} = {v!r}: must be a finite number "
                             + ("> 0" if name == "temperature" else "≥ 0"))


def scalefl_policy(capacities, *, unit_groups=None, depth_exponent: float = 0.5,
                   kd_weight: float = 1.0, temperature: float = 3.0) -> MaskPolicy:
    """Build the ScaleFL-style policy (see module docstring)."""
    hidden, exits = exit_layout(unit_groups)
    groups = list(unit_groups)
    check_options(depth_exponent, kd_weight, temperature)
    capacities = tuple(float(c) for c in capacities)
    num_layers, num_exits = len(hidden), len(exits)
    depths = np.array([depth_for(r, num_layers, float(depth_exponent)) for r in capacities],
                      np.int32)
    kd_weight, temperature = float(kd_weight), float(temperature)
    cache: dict = {}

    def level_units(params) -> dict[str, np.ndarray]:
        flat, _ = jax.tree_util.tree_flatten_with_path(params)
        shapes = {path_names(p): tuple(leaf.shape) for p, leaf in flat}
        key = tuple(sorted(shapes.items()))
        if key not in cache:
            per_level = [level_widths(shapes, groups, hidden, exits, r, int(d))
                         for r, d in zip(capacities, depths)]
            cache[key] = {g.name: (np.arange(g.size)[None, :]
                                   < np.array([w[g.name] for w in per_level])[:, None]
                                   ).astype(np.float32) for g in groups}
        return cache[key]

    def prepare(params, round_index, key):
        del round_index, key
        return {"units": {k: jnp.asarray(v) for k, v in level_units(params).items()},
                "rate": jnp.asarray(capacities, jnp.float32),
                "depth": jnp.asarray(depths),
                "exit_weights": jnp.asarray(np.arange(num_exits)[None, :] < depths[:, None],
                                            jnp.float32)}

    def mask(params, spec):
        m = units.expand(params, groups, spec["units"])
        ew = spec["exit_weights"]
        for i in range(num_layers):   # whole modules beyond the depth (exit biases too)
            for name in (hidden[i], exits[i]):
                m[name] = jax.tree_util.tree_map(lambda t: t * ew[i].astype(t.dtype), m[name])
        return m

    def apply(params, spec):
        return jax.tree_util.tree_map(jnp.multiply, params, mask(params, spec))

    def readout(outputs, spec):
        return outputs[spec["depth"] - 1]

    def objective(outputs, y, spec):
        ew = spec["exit_weights"].astype(outputs.dtype)
        labels = jnp.broadcast_to(y, outputs.shape[:2])
        ce = optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean(-1)   # [E]
        loss = (ew * ce).sum() / ew.sum()
        if kd_weight == 0.0:
            return loss
        t = temperature
        teacher = jax.lax.stop_gradient(readout(outputs, spec)) / t
        p_t = jax.nn.softmax(teacher, -1)
        kl = (p_t * (jax.nn.log_softmax(teacher, -1)[None]
                     - jax.nn.log_softmax(outputs / t, -1))).sum(-1).mean(-1) * t * t   # [E]
        student = ew * (jnp.arange(outputs.shape[0]) != spec["depth"] - 1)
        return loss + kd_weight * (student * kl).sum() / jnp.maximum(student.sum(), 1.0)

    return MaskPolicy(name="scalefl", prepare=prepare, client_spec=select_level,
                      apply=apply, mask=mask, objective=objective, readout=readout)
