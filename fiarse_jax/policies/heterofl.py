"""HeteroFL (Diao et al., ICLR 2021): static sub-models of leading channels.

A client of ratio r keeps the first ⌈r·C⌉ output units of every hidden layer
(inputs follow the previous layer; the image input and the class outputs stay
full). With ``scaler=True`` (HeteroFL's default) hidden outputs are scaled by 1/r.
HeteroFL drops the scaler at inference because a (static) BatchNorm after every
layer absorbs the scale; our digits models have no normalisation, so the
sub-model is evaluated as it was trained, with the scaler.
"""
from __future__ import annotations

from fiarse_jax.policies.structured import leading_units, require_groups, structured_policy


def heterofl_policy(capacities, *, unit_groups=None, scaler: bool = True):
    groups = require_groups("heterofl", unit_groups)
    fixed = leading_units(groups, capacities)
    return structured_policy("heterofl", groups, capacities, lambda p, r, k: fixed,
                             scale_outputs=bool(scaler))
