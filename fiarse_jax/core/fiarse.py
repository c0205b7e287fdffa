"""FIARSE itself: the importance-aware sub-model and its gradient.

A client of capacity r trains the sub-model x ⊙ M(x) with M(x) = 1[|x| ≥ θ_r],
θ_r fixed for the round but M re-evaluated from the current weights at every
forward pass, so a weight that shrinks below θ_r during local training drops out
(Wu et al., NeurIPS 2024, Sec. 3).

Gradient (paper Sec. 4, Eq. 3, "threshold-controlled biased gradient descent",
TCB-GD): the mask is given the surrogate derivative ∂M/∂|x| = 2θ/(|x|+θ)² on the
kept set. By the chain rule through x·M(|x|) the gradient w.r.t. a kept x is

    g ⊙ M ⊙ (1 + 2|x|θ / (|x|+θ)²),

and 0 for a dropped x. This is ``gradient="tcb"`` (the default). The authors'
code implements the same rule as a custom backward, but on a bool tensor that
PyTorch never differentiates, so their released runs used the plain masked
gradient g ⊙ M: that is ``gradient="masked"``.

(The Eq. 3 formula was checked against the authors' backward (``Bern`` in
``fiarse/model/model_utils.py``) and a re-derivation; the paper's Sec. 4 text
itself was not readable offline.)

At θ = 0 and x = 0 the factor is 0/0; it is defined as 0 there (factor 1), and
computed with a guarded division so no NaN can hide behind a select under jit.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from fiarse_jax.core import masks as masks_lib

GRADIENTS = ("tcb", "masked")


def tcb_factor(x: jax.Array, theta: jax.Array) -> jax.Array:
    """The Eq. 3 gradient factor 1 + 2|x|θ/(|x|+θ)², with the 0/0 case (x = θ = 0) defined as 1.

    Args:
      x: weights, any shape.
      theta: θ, broadcastable to ``x``.

    Returns:
      The factor, shaped like ``x``; the division is guarded, so no NaN under jit.
    """
    a = jnp.abs(x)
    denom = (a + theta) ** 2
    safe = jnp.where(denom > 0, denom, jnp.ones_like(denom))
    return 1.0 + jnp.where(denom > 0, 2.0 * a * theta / safe, jnp.zeros_like(denom))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _masked_leaf(x: jax.Array, theta: jax.Array, gradient: str) -> jax.Array:
    return x * (jnp.abs(x) >= theta).astype(x.dtype)


def _masked_leaf_fwd(x, theta, gradient):
    return _masked_leaf(x, theta, gradient), (x, theta)


def _masked_leaf_bwd(gradient, res, g):
    x, theta = res
    keep = (jnp.abs(x) >= theta).astype(g.dtype)
    gx = g * keep
    if gradient == "tcb":
        gx = gx * tcb_factor(x, theta).astype(g.dtype)
    return gx, jnp.zeros_like(theta)  # θ is fixed within a round


_masked_leaf.defvjp(_masked_leaf_fwd, _masked_leaf_bwd)


def check_gradient(gradient: str) -> None:
    """Check a gradient mode name.

    Args:
      gradient: ``"tcb"`` or ``"masked"`` (``GRADIENTS``).

    Raises:
      ValueError: any other name.
    """
    if gradient not in GRADIENTS:
        raise ValueError(f"unknown gradient mode {gradient!r}; expected one of {GRADIENTS}")


def submodel(params: Any, thresholds, *, gradient: str = "tcb",
             is_maskable: masks_lib.IsMaskable | None = None) -> Any:
    """x ⊙ 1[|x| ≥ θ] leaf by leaf, differentiable with the chosen gradient rule.

    Args:
      params: the (global or local) parameter pytree x.
      thresholds: a scalar θ (global scope) or a pytree like ``params`` of
        per-leaf scalars (layer scope), e.g. from ``masks.importance_threshold``.
      gradient: ``"tcb"`` (paper Eq. 3) or ``"masked"`` (g ⊙ M, the authors' runs).
      is_maskable: which leaves may be masked, ``(path, leaf) -> bool`` (default:
        ``masks.default_maskable``); the others pass through unchanged.

    Returns:
      The sub-model, a pytree like ``params`` (θ gets no gradient: it is fixed
      within a round).

    Raises:
      ValueError: an unknown ``gradient``.
    """
    check_gradient(gradient)
    flags = masks_lib.maskable_flags(params, is_maskable)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    th = masks_lib.broadcast_thresholds(params, thresholds)
    out = [_masked_leaf(l, jax.lax.stop_gradient(jnp.asarray(t, l.dtype)), gradient)
           if f else l for l, t, f in zip(leaves, th, flags)]
    return jax.tree_util.tree_unflatten(treedef, out)
