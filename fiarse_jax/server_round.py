"""The server's work on one round's client updates, as one jitted function.

``make_server_round(...)`` returns ``(params, deltas, masks, levels, key, divisor) ->
(new_params, info)``:

1. screen the updates (``validation.validate_updates``): non-finite updates are always
   rejected (a NaN never reaches the global model); norm outliers and updates against
   the consensus direction only when their thresholds are given;
2. combine the accepted ones: a mask-aware rule from ``aggregators`` (``mean`` is the
   holder average), or, with differential privacy, DP-FedAvg — clip each client's delta
   to L2 norm C, sum over holders, add N(0, (σC)²) per coordinate, divide by the fixed
   public ``divisor`` (``privacy.expected_holders``; see ``privacy`` for why not the
   realised holder count);
3. apply ``w ← w − η_g · agg`` (``params`` is donated).

``info``: ``accepted`` bool[n] and ``reason`` int[n] (``validation.REASONS``). A round in
which every update is rejected leaves the model unchanged (every aggregate is 0).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fiarse_jax import aggregators, privacy, validation
from fiarse_jax.server import apply_update, holder_average

Params = Any


def make_server_round(*, aggregator: str = "mean", aggregator_options: dict | None = None,
                      z_threshold: float | None = None, cosine_threshold: float | None = None,
                      server_lr: float = 1.0, dp_noise_multiplier: float = 0.0,
                      dp_clip_norm: float = 1.0) -> Callable:
    """The jitted round step; options are checked here, once, with the bad value named."""
    options = dict(aggregator_options or {})
    combine = aggregators.rule(aggregator, options)
    dp = dp_noise_multiplier > 0
    if dp and aggregator != "mean":
        raise ValueError(f"differential privacy is DP-FedAvg (the clipped mean); it does not "
                         f"combine with aggregator = {aggregator!r}")

    def step(params, deltas, masks, levels, key, divisor):
        accepted, reason = validation.validate_updates(
            deltas, masks, levels, z_threshold=z_threshold, cosine_threshold=cosine_threshold)
        masks = aggregators.weight_masks(masks, accepted)
        # Rejected or unheld entries may be NaN: zero them so no product can carry one.
        deltas = jax.tree_util.tree_map(lambda d, m: jnp.where(m > 0, d, 0), deltas, masks)
        if dp:
            clipped, _ = privacy.clip_updates(deltas, masks, dp_clip_norm)
            agg = privacy.noisy_holder_average(clipped, masks, key,
                                               noise_multiplier=dp_noise_multiplier,
                                               clip_norm=dp_clip_norm, divisor=divisor)
        elif aggregator == "mean":   # per leaf: no [clients, all params] copy as the rules make
            agg, _ = holder_average(deltas, masks)
        else:
            agg, _ = combine(deltas, masks, **options)
        return apply_update(params, agg, server_lr), {"accepted": accepted, "reason": reason}

    return jax.jit(step, donate_argnums=0)
