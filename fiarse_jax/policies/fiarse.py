"""FIARSE as a mask policy: magnitude thresholds per capacity level.

``prepare`` computes θ_r for every level from the received global model with one
sort (``masks.importance_thresholds``); θ is then fixed for the round. ``apply``
is ``fiarse.submodel`` (mask re-evaluated from the current weights each forward
pass, Eq. 3 or masked gradient). ``mask`` is the sub-model the client received,
1[|x₀| ≥ θ_r] on the global weights: the server counts a client as a holder of
every coordinate it was sent, even one whose delta came out exactly 0 (the
authors count holders by ``delta ≠ 0`` instead).
"""
from __future__ import annotations

from collections.abc import Sequence

from fiarse_jax.core import fiarse as fiarse_lib
from fiarse_jax.core import masks as masks_lib
from fiarse_jax.policies.base import Gradient, MaskPolicy, Scope, select_level


def fiarse_policy(capacities: Sequence[float], *, scope: Scope = "global",
                  gradient: Gradient = "tcb",
                  is_maskable: masks_lib.IsMaskable | None = None,
                  group_fn: masks_lib.GroupFn | None = None,
                  unit_groups=None) -> MaskPolicy:
    """Build the FIARSE policy for the given capacity ratios (level i ↔ capacities[i]).

    ``unit_groups`` is accepted for the common builder signature and unused.
    """
    del unit_groups
    capacities = tuple(float(c) for c in capacities)
    masks_lib._check_scope(scope)
    fiarse_lib.check_gradient(gradient)

    def prepare(params, round_index, key):
        del round_index, key
        return masks_lib.importance_thresholds(
            params, capacities, scope=scope, is_maskable=is_maskable, group_fn=group_fn)

    def apply(params, spec):
        return fiarse_lib.submodel(params, spec, gradient=gradient, is_maskable=is_maskable)

    def mask(params, spec):
        return masks_lib.masks_from_thresholds(params, spec, is_maskable)

    return MaskPolicy(name="fiarse", prepare=prepare, client_spec=select_level,
                      apply=apply, mask=mask)
