"""HeteroFL (Diao et al., ICLR 2021): static sub-models of leading channels.

A client of capacity r keeps the first k_g units of every hidden layer / group g
(inputs follow the previous layer; the image input and the class outputs stay full).

A capacity is a fraction of *parameters* (``budget="params"``, the default, as for
FIARSE): k_g = max(1, ⌈w·C_g⌉) at the one width fraction w whose sub-model holds as
close to ⌈r·N⌉ of the N maskable parameters as the unit grid allows (see
``policies.structured``). On a model with several hidden layers w ≈ √r: the paper's
sizes {1/64, 1/16, 1/4, 1} are HeteroFL's own width rates {1/8, 1/4, 1/2, 1} squared.
``budget="width"`` restores the width-rate meaning, k_g = ⌈r·C_g⌉ (≈ r² of the
parameters on a deep model).

With ``scaler=True`` (HeteroFL's default) hidden outputs are scaled by 1/rate during
training, the rate being the width the layer runs at: k_g/C_g under
``budget="params"``, r under ``budget="width"`` (HeteroFL's 1/model-rate). HeteroFL
drops the scaler at inference because a (static) BatchNorm after every layer absorbs
the scale; here the sub-model is evaluated as it was trained, with the scaler, and
``check_model`` (run by ``validate_config``) refuses the scaler on a model without
normalisation layers (levels sharing a unit would train it at different scales).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fiarse_jax.policies.structured import (
    Budget,
    leading_masks,
    level_counts,
    require_groups,
    structured_policy,
)


def heterofl_policy(capacities, *, unit_groups=None, scaler: bool = True,
                    budget: Budget = "params", is_maskable=None):
    """``budget``: ``"params"`` | ``"width"`` (module docstring); ``is_maskable``: the
    model's maskability rule (which leaves N counts), default ``masks.default_maskable``."""
    groups = require_groups("heterofl", unit_groups)
    counts = level_counts(groups, capacities, budget, is_maskable)
    return structured_policy("heterofl", groups, capacities,
                             lambda p, r, k: leading_masks(groups, counts(p)),
                             scale_outputs=bool(scaler),
                             scale_by="width" if budget == "params" else "rate")


def check_model(options: Mapping[str, Any], model_cls: type | None,
                model: Mapping[str, Any]) -> None:
    """The registry's model rule: ``scaler=True`` needs a model class with ``normalized``
    true (a norm layer absorbs the 1/rate scale). Raises ``ValueError`` naming
    ``heterofl.scaler``."""
    if options.get("scaler", True) and not getattr(model_cls, "normalized", False):
        raise ValueError(f"heterofl.scaler = {options.get('scaler', True)!r}: model "
                         f"{model.get('name')!r} has no normalisation layer to absorb "
                         "HeteroFL's 1/r output scale (levels sharing a unit then train it "
                         "at scales 1, 4, 16, … and diverge); set it False")
