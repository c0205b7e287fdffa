"""The server's work on one round's client updates, as one jitted function.

``make_server_round(...)`` returns ``(params, deltas, masks, levels, key, divisor) ->
(new_params, info)``:

1. screen the updates (``validation.validate_updates``): non-finite updates, and clients
   excluded by reputation, are always refused (a NaN never reaches the global model);
   norm outliers and updates against the consensus direction (on each client's held
   coordinates, or on the round's core) only when their thresholds are given, and then
   rejected (a direction verdict may only flag instead: ``direction_action``);
2. combine the accepted ones: a mask-aware rule from ``aggregators`` (``mean`` is the
   holder average), or, with differential privacy, DP-FedAvg — clip each client's delta
   to L2 norm C, sum over holders, add N(0, (σC)²) per coordinate, divide by the fixed
   public ``divisor`` (``privacy.expected_holders``; see ``privacy`` for why not the
   realised holder count);
3. apply ``w ← w − η_g · agg`` (``params`` is donated).

``info``: ``accepted`` bool[n] and ``reason`` int[n] (``validation.REASONS``). A round in
which every update is rejected leaves the model unchanged (every aggregate is 0).

``make_streaming_round(...)`` is the same server for rounds whose rule is a sum over the
clients (the holder mean, norm-bounded mean, DP-FedAvg; only the non-finite screen):
``contribution`` maps one client's result to ``(sums, ClientStats)`` (what
``engine.make_round_runner(..., reduce=...)`` adds up over clients while they train) and
``finish`` turns the round's sums into the new model, so no round ever holds every
client's delta. ``stream_blocker`` says why a configuration needs the stacked path (order
statistics, Krum, the norm/direction screens and attacks look at all the updates together).
"""
from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fiarse_jax.core.server import apply_update, holder_average, holder_mean
from fiarse_jax.robust import aggregators, privacy, validation


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """The server's rule (``config.server``; defaults: configs/default.py's).

    Attributes:
      learning_rate: η_g of ``w ← w − η_g · aggregate(deltas)``.
      aggregator: the rule (``aggregators.AGGREGATORS``), ``aggregator_options`` its
        options (``config.server.<aggregator>``).
      validate: screen updates (``z_threshold``, ``cosine_threshold``, ``screen``,
        ``direction_action``; see ``make_server_round``).
      exclude_after_flags: reputation: exclude a client flagged this many times (0: never).
    """

    learning_rate: float = 1.0
    aggregator: str = "mean"
    aggregator_options: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))
    validate: bool = False
    z_threshold: float = 3.5
    cosine_threshold: float = 0.0
    screen: str = "held"
    direction_action: str = "reject"
    exclude_after_flags: int = 0

Params = Any
#: What a direction verdict does (``make_server_round``).
DIRECTION_ACTIONS = ("reject", "flag")


def make_server_round(*, aggregator: str = "mean", aggregator_options: dict | None = None,
                      z_threshold: float | None = None, cosine_threshold: float | None = None,
                      screen: str = "held", direction_action: str = "reject",
                      server_lr: float = 1.0,
                      dp_noise_multiplier: float = 0.0, dp_clip_norm: float = 1.0) -> Callable:
    """The jitted round step; options are checked here, once, with the bad value named.

    Args:
      aggregator: a rule name from ``aggregators.AGGREGATORS``; must be ``"mean"``
        with differential privacy.
      aggregator_options: the rule's options (``aggregators.rule``).
      z_threshold: norm-outlier threshold (``validation.validate_updates``); None off.
      cosine_threshold: direction threshold (``validation.validate_updates``); None off.
      screen: where those two tests look, ``"held"`` or ``"core"`` (``validation``).
      direction_action: what a direction verdict does: ``"reject"`` the update, or
        ``"flag"`` it only (the update is used; the verdict goes to the client's record,
        and ``reputation`` excludes clients flagged persistently). With non-IID clients an
        honest update points against the consensus now and then; an attacker does so
        round after round. Norm outliers, non-finite updates and excluded clients are
        refused either way.
      server_lr: the server learning rate η_g.
      dp_noise_multiplier: σ; > 0 turns on DP-FedAvg.
      dp_clip_norm: the clipping norm C.

    Returns:
      ``step(params, deltas, masks, levels, key, divisor, excluded=None) -> (new_params,
      info)`` (see the module docstring): ``deltas``/``masks`` pytrees like params with a
      leading client axis, ``levels`` int[n], ``key`` the server's PRNG key (used
      only by DP), ``divisor`` DP's fixed public divisor, ``excluded`` bool[n] the
      clients refused by reputation (``reputation.excluded``). ``params`` is donated.

    Raises:
      ValueError: an unknown aggregator or bad options, or DP with a rule other
        than ``"mean"``.
    """
    options = dict(aggregator_options or {})
    combine = aggregators.rule(aggregator, options)
    if direction_action not in DIRECTION_ACTIONS:
        raise ValueError(f"direction_action = {direction_action!r} must be one of "
                         f"{DIRECTION_ACTIONS}")
    dp = dp_noise_multiplier > 0
    if dp and aggregator != "mean":
        raise ValueError(f"differential privacy is DP-FedAvg (the clipped mean); it does not "
                         f"combine with aggregator = {aggregator!r}")

    def step(params, deltas, masks, levels, key, divisor, excluded=None):
        accepted, reason = validation.validate_updates(
            deltas, masks, levels, z_threshold=z_threshold, cosine_threshold=cosine_threshold,
            screen=screen, excluded=excluded)
        if direction_action == "flag":   # a direction verdict is recorded, not refused
            accepted = accepted | (reason == validation.REASONS.index("direction"))
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


class ClientStats(NamedTuple):
    """What a streamed round keeps per client (everything else is summed away)."""

    loss: jax.Array       # mean training loss over the local steps
    norm: jax.Array       # L2 norm of the delta over the coordinates it holds (0 if rejected)
    accepted: jax.Array   # bool: every held coordinate finite
    reason: jax.Array     # int32: ``validation.REASONS`` index (0 ok, 1 non_finite)


class StreamingRound(NamedTuple):
    """``make_streaming_round``'s step in two halves.

    Attributes:
      contribution: ``ClientResult -> ((totals, counts), ClientStats)``, what the
        engine sums (and stacks) over a round's clients.
      finish: ``(params, sums, key, divisor) -> new params`` (jitted, ``params``
        donated).
    """

    contribution: Callable   # ClientResult -> ((totals, counts), ClientStats)
    finish: Callable         # (params, sums, key, divisor) -> new params (params donated)


#: Rules that are a sum of per-client contributions: the holder mean, and the holder mean
#: of deltas each scaled to a norm bound (DP-FedAvg's clip is the same scaling).
STREAMABLE = ("mean", "norm_bounded")


def stream_blocker(*, aggregator: str = "mean", z_threshold: float | None = None,
                   cosine_threshold: float | None = None, attack: str = "none",
                   reputation: bool = False) -> str | None:
    """Why these server settings need every client's update at once (None: they do not).

    Args:
      aggregator: the rule name; only ``STREAMABLE`` ones stream.
      z_threshold: the norm-outlier threshold; None for none.
      cosine_threshold: the direction threshold; None for none.
      attack: the attack name; ``"none"`` for none.
      reputation: whether clients are excluded by their record (``reputation``).

    Returns:
      A sentence naming the setting that blocks streaming, or None.
    """
    if aggregator not in STREAMABLE:
        return f"aggregator = {aggregator!r} is not a sum over clients"
    if z_threshold is not None or cosine_threshold is not None:
        return "update validation compares the clients' updates with each other"
    if attack != "none":
        return f"attack = {attack!r} transforms the stacked updates"
    if reputation:
        return "reputation refuses clients by their record in the stacked server step"
    return None


def make_streaming_round(*, server_lr: float = 1.0, dp_noise_multiplier: float = 0.0,
                         dp_clip_norm: float = 1.0, aggregator: str = "mean",
                         aggregator_options: dict | None = None) -> StreamingRound:
    """``make_server_round``'s step for a ``STREAMABLE`` rule or DP-FedAvg, split in two.

    A per-client contribution and a finish, equal to the stacked step up to float
    summation order (tested). Only the non-finite screen applies.

    Args:
      server_lr, dp_noise_multiplier, dp_clip_norm, aggregator, aggregator_options:
        as in ``make_server_round``.

    Returns:
      A ``StreamingRound``: ``contribution`` maps one client's ``ClientResult`` to
      ``((totals, counts), ClientStats)`` (totals float32 pytree like params;
      counts float32 like params, or ``()`` under DP), ``finish(params, sums, key,
      divisor)`` gives the new model.

    Raises:
      ValueError: a rule that is not a sum over clients (``stream_blocker``), bad
        options, or DP with a rule other than ``"mean"``.
    """
    blocker = stream_blocker(aggregator=aggregator)
    if blocker:
        raise ValueError(f"make_streaming_round: {blocker}")
    options = dict(aggregator_options or {})
    aggregators.rule(aggregator, options)   # the options checked as the stacked rule does
    max_norm = (aggregators.check_max_norm(options["max_norm"]) if aggregator == "norm_bounded"
                else None)
    dp = dp_noise_multiplier > 0
    if dp and aggregator != "mean":
        raise ValueError(f"differential privacy is DP-FedAvg (the clipped mean); it does not "
                         f"combine with aggregator = {aggregator!r}")

    def contribution(result):
        finite = validation.held_finite(result.delta, result.mask)
        held = jax.tree_util.tree_map(lambda m: (m > 0) & finite, result.mask)
        deltas = jax.tree_util.tree_map(
            lambda d, h: jnp.where(h, d, 0).astype(jnp.float32), result.delta, held)
        norm = jnp.sqrt(sum(jnp.sum(d * d) for d in jax.tree_util.tree_leaves(deltas)))
        if dp:   # privacy.clip_updates for one client
            factor = jnp.minimum(1.0, dp_clip_norm / jnp.maximum(norm, 1e-30))
            deltas = jax.tree_util.tree_map(lambda d: d * factor, deltas)
        elif max_norm is not None:   # aggregators.norm_bounded for one client
            factor = max_norm / jnp.maximum(norm, max_norm)
            deltas = jax.tree_util.tree_map(lambda d: d * factor, deltas)
        counts = () if dp else jax.tree_util.tree_map(lambda h: h.astype(jnp.float32), held)
        stats = ClientStats(result.loss, norm, finite,
                            jnp.where(finite, 0, 1).astype(jnp.int32))
        return (deltas, counts), stats

    def finish(params, sums, key, divisor):
        totals, counts = sums
        if dp:
            agg = privacy.noisy_mean(totals, key, noise_multiplier=dp_noise_multiplier,
                                     clip_norm=dp_clip_norm, divisor=divisor, like=params)
        else:
            agg = holder_mean(totals, counts, params)
        return apply_update(params, agg, server_lr)

    return StreamingRound(contribution, jax.jit(finish, donate_argnums=0))
