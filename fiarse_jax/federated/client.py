"""The client update: K local optimiser steps on a sub-model, as pure functions.

Split fedjax-style into ``init`` / ``step`` / ``final`` so that every execution
strategy in ``engine`` (a Python loop of jitted steps, or vmap over clients with
the steps in a scan) runs the very same arithmetic.

Conventions:
* ``delta = params_received − params_trained`` (old − new, as the authors' code);
  the server applies ``w ← w − η_g · avg(delta)``.
* ``mask`` is the sub-model the client *received* (``policy.mask`` at the
  round's start); θ and the round's spec stay fixed, while ``policy.apply``
  may re-evaluate the mask from the current weights at every step (FIARSE does).
  The delta is exactly 0 outside ``mask`` whatever the optimiser does there
  (AdamW's decoupled weight decay shrinks every local weight; its moments start at
  0 each round, so a coordinate with no gradient gets no Adam step).
* Batches: the client walks through its ``count`` valid rows ``batch_size`` at a
  time, in a fresh random order for every pass over them (an epoch; a batch that
  crosses the end of a pass takes its last rows from the next pass's order, so a
  client with fewer rows than a batch repeats rows). Padding rows beyond ``count``
  are never read, so unequal client sizes need no truncation.
* Randomness: the client's key is split into named streams (``rng.client_streams``):
  ``order`` (one permutation per pass, ``fold_in(order, pass)``) and ``steps``
  (``fold_in(steps, k)`` per step, split into the augmentation key and the loss's key);
  the policy's per-client draw uses the ``spec`` stream (see ``algorithm.build_algorithm``).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fiarse_jax.core import rng as rng_lib
from fiarse_jax.data.types import ClientData
from fiarse_jax.policies.base import MaskPolicy

Params = Any
#: ``EngineOptions.dtype`` → the client's compute dtype (None: the parameters' own).
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ClientOptions:
    """The clients' local training (``config.client``; defaults: configs/default.py's).

    Attributes:
      optimizer: ``sgd`` (plain: no momentum, no weight decay, as the paper's CIFAR runs)
        or ``adamw``.
      learning_rate: η of the local optimiser.
      batch_size: rows per local step.
      local_steps: K, every client's local steps (unless ``local_epochs`` > 0).
      local_epochs: E > 0: each client runs ⌈E·n/batch⌉ steps of its own n rows instead.
      betas: AdamW's (β1, β2).
      weight_decay: AdamW's decoupled weight decay.
    """

    learning_rate: float = 0.1
    batch_size: int = 20
    local_steps: int = 20
    local_epochs: float = 0.0
    optimizer: str = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4


def make_optimizer(options: ClientOptions) -> optax.GradientTransformation:
    """The client optimiser, created afresh every round (clients keep no state).

    ``sgd``: plain SGD, as the paper's CIFAR runs. ``adamw``: optax's AdamW with
    ``betas`` and ``weight_decay`` (the paper's AG News runs use (0.9, 0.95) and 0).
    """
    if options.optimizer == "sgd":
        return optax.sgd(options.learning_rate)
    b1, b2 = (float(b) for b in options.betas)
    return optax.adamw(options.learning_rate, b1=b1, b2=b2, weight_decay=options.weight_decay)


def local_steps(options: ClientOptions, train_sizes) -> int:
    """K, the local steps a round runs: ``local_steps``, or with ``local_epochs`` E > 0
    the largest client's ⌈E·n/batch⌉ (each client stops at its own count; see
    ``make_client_fns``)."""
    if options.local_epochs <= 0:
        return int(options.local_steps)
    return max(1, math.ceil(options.local_epochs * int(np.max(train_sizes))
                            / options.batch_size))

#: (sub-model params, x batch, y batch, rng, client spec) -> scalar mean loss.
LossFn = Callable[[Params, jax.Array, jax.Array, jax.Array, Any], jax.Array]


class ClientState(NamedTuple):
    """A client's carry between local steps.

    Attributes:
      params: the local parameters being trained.
      opt_state: the optimiser state.
      order_key: pass e's row order is ``pass_order(fold_in(order_key, e), …)``.
      rng: the ``steps`` stream: step k uses ``fold_in(rng, k)``.
      loss_sum: float32 sum of the step losses.
      steps: int32 local steps taken (< num_steps with local_epochs).
    """

    params: Params
    opt_state: Any
    order_key: jax.Array  # pass e's row order is ``pass_order(fold_in(order_key, e), …)``
    rng: jax.Array        # the ``steps`` stream: step k uses ``fold_in(rng, k)``
    loss_sum: jax.Array
    steps: jax.Array     # local steps taken (< num_steps with local_epochs)


class ClientResult(NamedTuple):
    """One client's round, as sent to the server (stacked: a leading client axis).

    Attributes:
      delta: old − new, pytree like params; exactly 0 outside ``mask``.
      mask: 0/1 uint8 pytree like params, coordinates held (a quarter of a float32
        mask's memory).
      loss: mean training loss over the K steps.
    """

    delta: Params        # old − new
    mask: Params         # 0/1 uint8, coordinates held (a quarter of a float32 mask's memory)
    loss: jax.Array      # mean training loss over the K steps


class ClientFns(NamedTuple):
    """The three pure pieces of a client update, plus K."""

    init: Callable[[Params, Any, ClientData, jax.Array], ClientState]
    step: Callable[[ClientState, Any, ClientData, jax.Array], ClientState]
    final: Callable[[Params, ClientState, Any], ClientResult]
    num_steps: int


def make_client_fns(loss_fn: LossFn, policy: MaskPolicy,
                    optimizer: optax.GradientTransformation, *,
                    num_steps: int, batch_size: int,
                    augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
                    compute_dtype: Any = None, local_epochs: float = 0.0,
                    min_rows: int = 1) -> ClientFns:
    """Client update for ``policy``: ``num_steps`` steps of ``optimizer`` at ``batch_size``.

    Args:
      loss_fn: ``(sub-model params, x batch, y batch, rng, spec) -> scalar mean loss``.
      policy: the mask policy (``apply`` gives the trained sub-model, ``mask`` the
        coordinates held).
      optimizer: the local optax optimiser (its state starts fresh every round).
      num_steps: K, the local steps every strategy runs.
      batch_size: B, rows per step.
      augment: ``augment(x_batch, key)``, when given, transforms every batch on device
        (e.g. CIFAR crop + flip + normalisation) with a key drawn from the client's
        stream.
      compute_dtype: (e.g. ``jnp.bfloat16``) mixed precision — the forward and
        backward pass run on the sub-model and batch cast to it, while the mask, the
        parameters, the optimiser and the delta stay in their own (float32) dtype.
      local_epochs: E > 0: each client takes ⌈E·count/batch_size⌉ steps of its own (E
        passes over its data, as the paper's AG News clients), capped by ``num_steps``,
        which should then be the largest client's count; later steps leave the state
        unchanged, so every strategy runs the same ``num_steps`` iterations (vmapped
        clients run in step). 0: always ``num_steps``.
      min_rows: a lower bound on every client's row count (fewer orders drawn per step
        when it is ≥ ``batch_size``; see ``batch_rows``).

    Returns:
      ``ClientFns``: ``init(params, spec, data, key)``, ``step(state, spec, data, k)``,
      ``final(params0, state, spec) -> ClientResult`` and ``num_steps``.
    """
    def cast(tree):
        if compute_dtype is None:
            return tree
        return jax.tree_util.tree_map(
            lambda a: a.astype(compute_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
            tree)

    def init(params, spec, data: ClientData, key):
        del spec
        streams = rng_lib.client_streams(key)
        return ClientState(params=params, opt_state=optimizer.init(params),
                           order_key=streams["order"], rng=streams["steps"],
                           loss_sum=jnp.zeros((), jnp.float32),
                           steps=jnp.zeros((), jnp.int32))

    def step(state: ClientState, spec, data: ClientData, k):
        idx = batch_rows(state.order_key, data.count, data.y.shape[0], k, batch_size,
                         min_rows)
        xb, yb = data.x[idx], data.y[idx]
        k_aug, sub = jax.random.split(jax.random.fold_in(state.rng, k))
        if augment is not None:
            xb = augment(xb, k_aug)

        def objective(p):
            return loss_fn(cast(policy.apply(p, spec)), cast(xb), yb, sub, spec)

        loss, grads = jax.value_and_grad(objective)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = ClientState(params, opt_state, state.order_key, state.rng,
                          state.loss_sum + loss.astype(jnp.float32), state.steps + 1)
        if local_epochs <= 0:
            return new
        own = jnp.maximum(1, jnp.ceil(local_epochs * data.count / batch_size).astype(jnp.int32))
        return jax.tree_util.tree_map(lambda a, b: jnp.where(k < own, a, b), new, state)

    def final(params0, state: ClientState, spec):
        # Only coordinates the client received leave it: under plain SGD the others get
        # no gradient anyway, but weight decay (AdamW) would move them on the local copy.
        mask = policy.mask(params0, spec)
        delta = jax.tree_util.tree_map(
            lambda a, b, m: jnp.where(m > 0, a - b, jnp.zeros_like(a)),
            params0, state.params, mask)
        mask = jax.tree_util.tree_map(lambda m: (m > 0).astype(jnp.uint8), mask)
        return ClientResult(delta=delta, mask=mask, loss=state.loss_sum / state.steps)

    return ClientFns(init=init, step=step, final=final, num_steps=int(num_steps))


def pass_order(key: jax.Array, count: jax.Array, n_max: int) -> jax.Array:
    """The ``count`` valid row indices in a random order (key ``key``), then the padding rows.

    Args:
      key: PRNG key of this pass.
      count: int scalar, the client's valid rows.
      n_max: static, the padded row count.

    Returns:
      int [n_max] row indices.
    """
    scores = jax.random.uniform(key, (n_max,))
    return jnp.argsort(jnp.where(jnp.arange(n_max) < count, scores, 2.0))


def batch_rows(order_key: jax.Array, count: jax.Array, n_max: int, k, batch_size: int,
               min_count: int = 1) -> jax.Array:
    """Row indices of step ``k``'s batch in the endless walk through the client's rows.

    Positions k·B … k·B+B−1 of the walk, pass e in the order
    ``pass_order(fold_in(order_key, e))``. A batch crosses at most
    S = 1 + ⌈(B − 1)/min_count⌉ passes (2 when every client has ≥ B rows), so S orders
    (S sorts of n_max keys) are drawn per step.

    Args:
      order_key: the client's ``order`` stream.
      count: int scalar, the client's valid rows.
      n_max: static, the padded row count.
      k: the step index (may be traced).
      batch_size: B.
      min_count: a static lower bound on ``count``.

    Returns:
      int [batch_size] row indices, all < ``count``.
    """
    spans = 1 + -(-(batch_size - 1) // max(1, int(min_count)))
    pos = k * batch_size + jnp.arange(batch_size)
    first = (k * batch_size) // count
    passes, within = pos // count - first, pos % count
    orders = jax.vmap(lambda e: pass_order(jax.random.fold_in(order_key, first + e), count,
                                           n_max))(jnp.arange(min(spans, batch_size)))
    return orders[passes, within]


def client_update(fns: ClientFns, params: Params, spec: Any, data: ClientData,
                  key: jax.Array) -> ClientResult:
    """One client's whole round as one pure function: (params, spec, data, rng) → (delta, mask, loss).

    The K steps run in a ``fori_loop``, so it jits and vmaps.

    Args:
      fns: the client update (``make_client_fns``).
      params: the global parameter pytree the client received.
      spec: this client's spec (``policy.client_spec``).
      data: this client's ``ClientData`` (no client axis).
      key: this client's PRNG key.

    Returns:
      The client's ``ClientResult``.
    """
    state = fns.init(params, spec, data, key)
    state = jax.lax.fori_loop(0, fns.num_steps, lambda k, s: fns.step(s, spec, data, k), state)
    return fns.final(params, state, spec)
