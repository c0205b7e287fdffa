"""On-device image augmentation and normalisation, as jit-able array ops.

The client step calls ``train_transform(x, key)`` on every batch (inside the jitted
or vmapped round) and evaluation calls ``eval_transform(x)``, so images stay uint8 in
memory (O(dataset)) and augmentation costs no host round-trip. The CIFAR pipeline is
the authors' torchvision one: random crop 32 with 4-pixel zero padding, horizontal
flip with probability 1/2, then per-channel normalisation (crop and flip act on the
raw pixels, so padded pixels become (0 − mean)/std, as with torchvision).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

#: (images [B, H, W, C], key) -> float32 images; and images -> float32 images.
TrainTransform = Callable[[jax.Array, jax.Array], jax.Array]
EvalTransform = Callable[[jax.Array], jax.Array]


def to_unit(x: jax.Array) -> jax.Array:
    """uint8 pixels → float32 in [0, 1] (float inputs pass through as float32)."""
    return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)


def normalize(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """(x − mean) / std per channel (last axis)."""
    return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def random_crop(key: jax.Array, x: jax.Array, pad: int) -> jax.Array:
    """Zero-pad H and W by ``pad`` and take a random H×W window per image."""
    b, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(key, (b, 2), 0, 2 * pad + 1)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, x: jax.Array) -> jax.Array:
    """Mirror each image left-right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0],))
    return jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)


def cifar_train_transform(mean: Sequence[float] = CIFAR10_MEAN,
                          std: Sequence[float] = CIFAR10_STD, pad: int = 4) -> TrainTransform:
    """Crop (padding ``pad``) + flip + normalise: the authors' CIFAR training pipeline."""
    def transform(x, key):
        k_crop, k_flip = jax.random.split(key)
        return normalize(random_flip(k_flip, random_crop(k_crop, to_unit(x), pad)), mean, std)
    return transform


def cifar_eval_transform(mean: Sequence[float] = CIFAR10_MEAN,
                         std: Sequence[float] = CIFAR10_STD) -> EvalTransform:
    """Normalisation only (no augmentation at evaluation)."""
    def transform(x):
        return normalize(to_unit(x), mean, std)
    return transform
