"""2-D convolutions for the models, with the backward pass chosen per backend.

``conv_general_dilated(impl)`` is a drop-in for ``lax.conv_general_dilated`` that Flax's
``nn.Conv(conv_general_dilated=...)`` takes. Implementations (``CONV_IMPLS``):

* ``"xla"``: ``lax.conv_general_dilated`` and JAX's own gradient. On GPU/TPU XLA maps
  its backward convolutions to the vendor's backward-data / backward-filter kernels.
* ``"canonical"``: the same forward convolution with a custom VJP whose two backward
  convolutions are written in the forward layout (NHWC × HWIO → NHWC, transposes
  explicit). The arithmetic is that of ``"xla"`` (tested equal); what changes is what
  XLA's CPU compiler makes of it: inside a ``while`` loop (``lax.fori_loop``/``scan``:
  the vmap strategy's K local steps) it leaves JAX's backward convolutions, whose
  dimension labels are not the forward ones, to a naive emitted loop — a ResNet-18
  step at batch 20 took 23.6 s instead of 0.75 s and compiled 13× longer on 2 cores
  (jax-ml/jax#12868) — and it runs the canonical ones on its convolution library.
* ``"patches"``: the k×k shifted views of the padded input side by side (one strided
  slice per tap) times the kernel as a matrix. Under ``vmap`` with a kernel per client
  (the vmap strategy) both the forward and the two gradients are batched matrix products
  over the client axis, where XLA makes a grouped convolution of the others; the price
  is k² copies of each layer's input. Slower on CPU (copies dominate there); a GPU
  candidate, to be chosen by measurement (``benchmarks/suite.py``).
* ``"auto"``: ``"canonical"`` on CPU, ``"xla"`` elsewhere, decided at trace time.

A custom VJP has no forward-mode derivative: ``jax.jvp``/``jacfwd``/``hessian`` through
a ``"canonical"`` convolution raise; use ``"xla"`` for them (training uses reverse mode).

Only plain convolutions (NHWC × HWIO, no dilation, one feature group, no negative
padding, a padded input at least the kernel's size) take the custom paths; anything else
falls back to ``lax.conv_general_dilated``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "xla", "canonical", "patches")
_NHWC = ("NHWC", "HWIO", "NHWC")


def check(impl: str) -> str:
    """``impl`` if it names an implementation; else ``ValueError`` naming it (one line)."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"model.conv = {impl!r}: must be one of {CONV_IMPLS}")
    return impl


def resolve(impl: str, backend: str | None = None) -> str:
    """The concrete implementation of ``impl`` on ``backend`` (default: JAX's)."""
    if check(impl) != "auto":
        return impl
    backend = jax.default_backend() if backend is None else backend
    return "canonical" if backend == "cpu" else "xla"


def _plain(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def canonical_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                   padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """NHWC × HWIO → NHWC convolution whose gradient is two forward-layout convolutions.

    Args:
      x: [B, H, W, C_in] input.
      w: [kh, kw, C_in, C_out] kernel.
      strides: (sh, sw).
      padding: ((lo, hi), (lo, hi)) explicit padding of H and W.

    Returns:
      [B, H', W', C_out], exactly ``lax.conv_general_dilated(x, w, strides, padding)``.
    """
    return _plain(x, w, strides, padding)


def _forward(x, w, strides, padding):
    return _plain(x, w, strides, padding), (x, w)


def _backward(strides, padding, residuals, dy):
    x, w = residuals
    ks, ns, os_ = w.shape[:2], x.shape[1:3], dy.shape[1:3]
    # dL/dx: dy dilated by the stride, convolved with the flipped kernel (in ↔ out);
    # the padding puts every input pixel under the taps that read it.
    pad_x = tuple((k - 1 - lo, n - (o - 1) * s + lo - 1)
                  for k, n, o, s, (lo, _) in zip(ks, ns, os_, strides, padding))
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx = lax.conv_general_dilated(dy, w_t, (1, 1), pad_x, lhs_dilation=strides,
                                  dimension_numbers=_NHWC)
    # dL/dw: input channels as the batch, the batch as features, dy (spread by the
    # stride) as the kernel: the output is [C_in, kh, kw, C_out].
    pad_w = tuple((lo, k + (o - 1) * s - n - lo)
                  for k, n, o, s, (lo, _) in zip(ks, ns, os_, strides, padding))
    dw = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1),
                                  pad_w, rhs_dilation=strides, dimension_numbers=_NHWC)
    return dx.astype(x.dtype), dw.transpose(1, 2, 0, 3).astype(w.dtype)


canonical_conv.defvjp(_forward, _backward)


def patches_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                 padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """NHWC × HWIO → NHWC convolution as (k² shifted input views) × (kernel as a matrix).

    Exact copies (slices, no multiply-by-one that TF32 would round), then one matrix
    product whose reduction runs over (kh, kw, C_in) — the kernel's own HWIO order, so the
    kernel is only reshaped. Its gradients are a matrix product each and a sum of padded
    slices; arguments as ``canonical_conv``.
    """
    (kh, kw, cin, cout), (sh, sw) = w.shape, strides
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    oh, ow = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    views = [lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + (oh - 1) * sh + 1,
                                          j + (ow - 1) * sw + 1, cin), (1, sh, sw, 1))
             for i in range(kh) for j in range(kw)]
    cols = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    return jnp.einsum("bhwk,ko->bhwo", cols, w.reshape(kh * kw * cin, cout))


def _is_nhwc(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    return tuple(dimension_numbers) == _NHWC


def conv_general_dilated(impl: str = "auto") -> Callable[..., jax.Array]:
    """A ``lax.conv_general_dilated`` drop-in using implementation ``impl`` (module docstring).

    Args:
      impl: one of ``CONV_IMPLS``.

    Returns:
      ``f(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
      dimension_numbers=None, feature_group_count=1, ...)``, for ``nn.Conv``.

    Raises:
      ValueError: an unknown ``impl``.
    """
    check(impl)   # now, not at trace time

    def conv(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
             rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
             batch_group_count: int = 1, precision=None, preferred_element_type=None):
        plain = (lhs.ndim == 4 and _is_nhwc(dimension_numbers) and feature_group_count == 1
                 and batch_group_count == 1 and precision is None
                 and preferred_element_type is None
                 and all(d == 1 for d in tuple(lhs_dilation or (1, 1))
                         + tuple(rhs_dilation or (1, 1))))
        chosen = resolve(impl)
        if chosen != "xla" and plain:
            pads = (lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
                    if isinstance(padding, str) else padding)
            pads = tuple((int(lo), int(hi)) for lo, hi in pads)
            strides = tuple(int(s) for s in window_strides)
            fits = all(n + lo + hi >= k for n, (lo, hi), k in
                       zip(lhs.shape[1:3], pads, rhs.shape[:2]))
            if min(min(p) for p in pads) >= 0 and fits:   # else (a crop; no output): lax
                return (canonical_conv if chosen == "canonical" else patches_conv)(
                    lhs, rhs, strides, pads)
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)

    return conv
