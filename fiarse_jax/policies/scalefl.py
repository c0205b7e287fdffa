"""ScaleFL/DepthFL-style baseline (simplified): width and depth shrink together, early
exits, self-distillation from the deepest kept exit. See ``docs/scalefl.md``.

The model has E ≥ 2 exits, exit e (0-based) after *block* e, the last exit being the
output layer: ``MLP(early_exits=True)`` (block e = hidden layer e, exits ``Exit_e`` and
the output layer ``Dense_L``; E = L) or ``ResNet18(early_exits=True)`` (block e = stage
e+1, the stem in block 0, exits ``exit1 …`` and ``head``; E = S stages). The policy
reads this layout from the model's unit groups alone (``exit_layout``: an exit head is a
module that consumes a group and produces none), so both models share one code path.
A client of capacity r holds

* depth d_r = ⌈r^a · E⌉ (1 ≤ d_r ≤ E, a = ``depth_exponent``): blocks 0 … d_r−1 and
  their exits 0 … d_r−1; deeper blocks, their exits and (when d_r < E) the output
  layer are not held;
* width: the leading ⌈w_r·C⌉ units of every group of the kept blocks (hidden units,
  ResNet streams and block-inner channels alike; HeteroFL's shape), with w_r the ratio
  for which the sub-model's count of *maskable* parameters is closest to ⌈r·N⌉ (a tie →
  the smaller), N = the maskable parameters of the global model (``masks.maskable_flags``,
  the denominator FIARSE and ``run_summary.kept_fractions`` use; BN γ/β are not counted), at
  least one unit per kept group. The count is over the kept blocks and kept exits, each
  group axis at its kept width (``units.held_count``). So level r holds ≈ r·N maskable
  parameters, like FIARSE and the other structured baselines (the same search,
  ``units.widths_for_budget``; less when even full width at depth d_r is under r·N).
  The client also holds the BN γ/β of its kept channels (a few per channel).

Client spec (identical structure for every level, vmappable)::

    {"units": {group: 0/1 [C]}, "rate": r, "depth": d_r (int32),
     "exit_weights": 0/1 [E] (exit e held iff e < d_r)}

``objective``: cross-entropy averaged over the kept exits, plus ``kd_weight`` × the mean
over the kept exits except the deepest of T²·KL(softmax(z_deep/T) ‖ softmax(z_e/T)),
the teacher z_deep under ``stop_gradient`` (T = ``temperature``). ``readout``: the
deepest kept exit's logits (no ensembling).

Widths are derived from the global model's leaf shapes (static under ``jit``) at the
first ``prepare`` and cached; the builder only needs the model's unit groups (and,
optionally, its maskability rule ``is_maskable``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fiarse_jax.core import units
from fiarse_jax.core.masks import keep_count
from fiarse_jax.policies.base import MaskPolicy, select_level
from fiarse_jax.policies.structured import maskable_shapes

NEEDS = ("method 'scalefl' needs an MLP with early-exit heads and at least 2 hidden "
         "layers (config.model.name = 'mlp', config.model.early_exits = True, "
         "len(config.model.hidden_sizes) >= 2) or a ResNet-18 with early exits and at least "
         "2 stages (config.model.name = 'resnet18', config.model.early_exits = True, "
         "len(config.model.widths) >= 2)")


class ExitLayout(NamedTuple):
    """Where a model's exits sit, read from its unit groups (see ``exit_layout``).

    ``exits[e]``: exit e's top-level module, shallowest first (the last is the output
    layer). ``blocks[e]``: the top-level modules first needed by exit e (the MLP's hidden
    layer e; the ResNet's stage e+1, with the stem before stage 1). ``group_level``:
    {group: the exit index from which on the group is held}. Depth d keeps
    ``blocks[:d]`` and ``exits[:d]``.
    """

    blocks: tuple[tuple[str, ...], ...]
    exits: tuple[str, ...]
    group_level: dict[str, int]


def exit_layout(unit_groups) -> ExitLayout:
    """The exit/depth layout a model declares through its unit groups.

    A top-level module that produces some group is a *block*; blocks are ordered by
    their first appearance in the (forward-ordered) group list. A module that only
    consumes is an *exit*: it must read exactly one group and sits after that group's
    deepest producer. Exits are ordered by that position; block b belongs to the first
    exit at or after it. MLP(early_exits=True): blocks ``Dense_i``, exits ``Exit_i`` and
    the output layer. ResNet18(early_exits=True): blocks stem + stage1, stage2, …;
    exits ``exit1 …`` and ``head``. Raises ``ValueError`` for a model with fewer than 2
    exits (e.g. without exit heads) or exits that do not follow this shape.
    """
    if unit_groups is None:
        raise ValueError(NEEDS + "; this model declares no unit groups")
    groups = list(unit_groups)
    order: dict[str, int] = {}
    for g in groups:
        for m in g.producers:
            order.setdefault(m.path[0], len(order))
    last_producer = {g.name: max(order[m.path[0]] for m in g.producers) for g in groups}
    reads: dict[str, set] = {}
    for g in groups:
        for m in g.consumers:
            if m.path[0] not in order:
                reads.setdefault(m.path[0], set()).add(g.name)
    for name, gs in reads.items():
        if len(gs) != 1:
            raise ValueError(NEEDS + f"; exit {name!r} reads groups {sorted(gs)} "
                             "(expected exactly one)")
    attach = sorted((last_producer[next(iter(gs))], name) for name, gs in reads.items())
    at = [a for a, _ in attach]
    if len(set(at)) != len(at) or (at and at[-1] != len(order) - 1):
        raise ValueError(NEEDS + f"; exits {[n for _, n in attach]} do not follow the layers "
                         "(expected one exit after each hidden layer / stage, the output "
                         "layer last)")
    if len(attach) < 2:
        raise ValueError(NEEDS + f"; this model has {len(attach)} hidden layer(s) or "
                         "stage(s) with an exit head (the output layer is the last exit)")
    level = {m: next(e for e, a in enumerate(at) if i <= a) for m, i in order.items()}
    blocks = tuple(tuple(m for m in order if level[m] == e) for e in range(len(at)))
    group_level = {g.name: level[max((m.path[0] for m in g.producers), key=order.get)]
                   for g in groups}
    return ExitLayout(blocks, tuple(n for _, n in attach), group_level)


def depth_for(r: float, num_levels: int, depth_exponent: float) -> int:
    """d_r = ⌈r^a · E⌉, at least 1 (E exits: hidden layers / stages)."""
    return keep_count(float(r) ** depth_exponent, num_levels)


def held_count(shapes: dict, groups, layout: ExitLayout, depth: int,
               kept: dict[str, int]) -> int:
    """Scalars of ``shapes`` a depth-``depth`` client holds: the leaves of kept modules,
    every group axis at its kept width (``units.held_count``).

    ``shapes``: {path tuple: shape} of the leaves that count (the policy passes the
    maskable ones, ``structured.maskable_shapes``); ``kept``: {group: kept units}.
    """
    return units.held_count(kept_shapes(shapes, layout, depth), groups, kept)


def kept_shapes(shapes: dict, layout: ExitLayout, depth: int) -> dict:
    """``shapes`` without the leaves of the blocks and exits beyond ``depth``."""
    dropped = {m for b in layout.blocks[depth:] for m in b} | set(layout.exits[depth:])
    return {p: s for p, s in shapes.items() if p[0] not in dropped}


def level_widths(shapes: dict, groups, layout: ExitLayout, r: float,
                 depth: int) -> dict[str, int]:
    """Kept units per group: leading ⌈w·C⌉ of the groups held at ``depth``, 0 beyond, with
    w the ratio whose held count (``held_count``) is closest to ⌈r·N⌉, N = all of
    ``shapes`` (a tie → the smaller; ``units.widths_for_budget``)."""
    n_total = sum(int(np.prod(s)) for s in shapes.values())
    return units.widths_for_budget(
        kept_shapes(shapes, layout, depth), groups, keep_count(r, n_total),
        fixed={g.name: 0 for g in groups if layout.group_level[g.name] >= depth})


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


def check_option_ranges(options: Mapping[str, Any]) -> None:
    """The registry's option rule: ``check_options`` on a section's options (defaults
    filled in)."""
    check_options(**{k: options[k] for k in ("depth_exponent", "kd_weight", "temperature")
                     if k in options})


def check_model(options: Mapping[str, Any], model_cls: type | None,
                model: Mapping[str, Any]) -> None:
    """The registry's model rule: a model class with a ``depth_field`` (the field whose
    length is the number of exits: an MLP's ``hidden_sizes``, a ResNet's ``widths``),
    ``early_exits=True`` and at least 2 entries in that field. Raises ``ValueError``
    ``"model = '<name> early_exits=<v> <depth_field>=<layers>': <NEEDS>"``."""
    del options
    depth_field = getattr(model_cls, "depth_field", None)
    layers = tuple(model.get(depth_field, getattr(model_cls, depth_field))) if depth_field else ()
    exits = model.get("early_exits", False)
    if depth_field is None or exits is not True or len(layers) < 2:
        found = f"{model.get('name')} early_exits={exits}" + (
            f" {depth_field}={layers}" if depth_field else "")
        raise ValueError(f"model = {found!r}: {NEEDS}")


def scalefl_policy(capacities, *, unit_groups=None, depth_exponent: float = 0.5,
                   kd_weight: float = 1.0, temperature: float = 3.0,
                   is_maskable=None) -> MaskPolicy:
    """Build the ScaleFL-style policy (see module docstring)."""
    layout = exit_layout(unit_groups)
    groups = list(unit_groups)
    check_options(depth_exponent, kd_weight, temperature)
    capacities = tuple(float(c) for c in capacities)
    num_exits = len(layout.exits)
    depths = np.array([depth_for(r, num_exits, float(depth_exponent)) for r in capacities],
                      np.int32)
    kd_weight, temperature = float(kd_weight), float(temperature)
    cache: dict = {}

    def level_units(params) -> dict[str, np.ndarray]:
        shapes = maskable_shapes(params, is_maskable)
        key = tuple(sorted(shapes.items()))
        if key not in cache:
            per_level = [level_widths(shapes, groups, layout, r, int(d))
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
        for i in range(num_exits):   # whole modules beyond the depth (exit biases too)
            for name in layout.blocks[i] + (layout.exits[i],):
                m[name] = jax.tree_util.tree_map(lambda t, w=ew[i]: t * w.astype(t.dtype), m[name])
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
