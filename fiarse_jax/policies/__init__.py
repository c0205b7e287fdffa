"""Mask policies by name. Add a method: one module here plus one registry line.

A builder is ``builder(capacities, *, unit_groups=None, **options) -> MaskPolicy``;
``unit_groups`` is the model's unit description (``units.UnitGroup``), needed by the
structured methods; ``options`` come from ``config.<method>``.

Capacities are fractions of *parameters* for every method: a level r holds ≈ ⌈r·N⌉ of
the N maskable parameters. The structured builders (``heterofl``, ``fedrolex``,
``fed_dropout``, ``fiarse_neuron``, ``fedavg_smallest``) take ``budget="params"`` (that
rule: one common width ≈ √r on deep models, see ``policies.structured``) or
``budget="width"`` (⌈r·C⌉ units of every layer, the baselines' width ratios, ≈ r² of the
parameters on deep models); ``scalefl`` fills the same parameter budget.

``scalefl``: a simplified ScaleFL/DepthFL-style baseline (width and depth shrink
together, early exits, self-distillation); needs ``MLP(early_exits=True)`` or
``ResNet18(early_exits=True)``, see ``docs/scalefl.md``.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fiarse_jax.policies.base import MaskPolicy, select_level
from fiarse_jax.policies.fed_dropout import fed_dropout_policy
from fiarse_jax.policies.fedavg import fedavg_full_policy, fedavg_smallest_policy
from fiarse_jax.policies.fedrolex import fedrolex_policy
from fiarse_jax.policies.fiarse import fiarse_policy
from fiarse_jax.policies.fiarse_neuron import fiarse_neuron_policy
from fiarse_jax.policies.heterofl import heterofl_policy
from fiarse_jax.policies.scalefl import scalefl_policy

#: name -> builder(capacities, *, unit_groups=None, **options) -> MaskPolicy
POLICIES: dict[str, Callable[..., MaskPolicy]] = {
    "fiarse": fiarse_policy,
    "fiarse_neuron": fiarse_neuron_policy,
    "heterofl": heterofl_policy,
    "fedrolex": fedrolex_policy,
    "fed_dropout": fed_dropout_policy,
    "fedavg_full": fedavg_full_policy,
    "fedavg_smallest": fedavg_smallest_policy,
    "scalefl": scalefl_policy,
}

#: Methods whose masks drop whole units (the sub-model can be shrunk to dense arrays).
STRUCTURED = frozenset(POLICIES) - {"fiarse"}


def build_policy(name: str, capacities: Sequence[float],
                 options: Mapping[str, Any] | None = None, *, unit_groups=None,
                 is_maskable=None, group_fn=None) -> MaskPolicy:
    """The policy ``name`` for these capacity levels, with its config options.

    ``is_maskable(path, leaf)`` / ``group_fn(path)``: a model's own maskability rule and
    layer-scope θ groups (e.g. RoBERTa's: embeddings and encoder, head not masked); given
    to the builders that rank parameters (their signature names them), else unused.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(POLICIES)}")
    builder = POLICIES[name]
    accepted = inspect.signature(builder).parameters
    extra = {k: v for k, v in (("is_maskable", is_maskable), ("group_fn", group_fn))
             if v is not None and k in accepted}
    return builder(capacities, unit_groups=unit_groups, **extra, **dict(options or {}))


__all__ = ["MaskPolicy", "POLICIES", "STRUCTURED", "build_policy", "select_level"]
