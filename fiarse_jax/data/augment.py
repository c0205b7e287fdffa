"""On-device image augmentation and normalisation, as jit-able array ops.

The client step calls ``train_transform(x, key)`` on every batch (inside the jitted
or vmapped round) and evaluation calls ``eval_transform(x)``, so images stay uint8 in
memory (O(dataset)) and augmentation costs no host round-trip. The CIFAR pipeline is
the authors' torchvision one: random crop 32 with 4-pixel zero padding, horizontal
flip with probability 1/2, then per-channel normalisation (crop and flip act on the
raw pixels, so padded pixels become (0 − mean)/std, as with torchvision).

Normalisation constants. ``CIFAR10_MEAN`` is CIFAR-10's per-channel training mean.
Two standard deviations are in use: ``CIFAR10_STD`` = (0.2470, 0.2435, 0.2616) is
CIFAR-10's true per-channel std of the training pixels; ``AUTHORS_CIFAR_STD`` =
(0.2023, 0.1994, 0.2010) is the constant of a widely copied torchvision CIFAR recipe
(not the pixel std; a long-standing miscalculation) that the FIARSE authors' code uses
for CIFAR-10 and CIFAR-100 alike, so the paper's numbers were made with it. The transforms'
defaults, and the loaders' default for 32×32 RGB data (``image_transforms``), are the
authors' constants, so the paper's pipeline is reproduced unless a config says otherwise.

``check_image_options`` validates config.data's ``IMAGE_OPTIONS`` for every image dataset.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fiarse_jax.data import checks

#: config.data fields (of an image dataset) that set its normalisation and augmentation.
IMAGE_OPTIONS = ("mean", "std", "augment")
#: CIFAR-10's per-channel mean of the training pixels (RGB, in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
#: CIFAR-10's true per-channel std of the training pixels.
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
#: The std of the authors' (and many torchvision recipes') CIFAR normalisation, used for
#: the paper's CIFAR-10 and CIFAR-100 numbers; the default for 32×32 RGB data.
AUTHORS_CIFAR_STD = (0.2023, 0.1994, 0.2010)

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
                          std: Sequence[float] = AUTHORS_CIFAR_STD, pad: int = 4) -> TrainTransform:
    """Crop (padding ``pad``) + flip + normalise: the authors' CIFAR training pipeline."""
    def transform(x, key):
        k_crop, k_flip = jax.random.split(key)
        return normalize(random_flip(k_flip, random_crop(k_crop, to_unit(x), pad)), mean, std)
    return transform


def cifar_eval_transform(mean: Sequence[float] = CIFAR10_MEAN,
                         std: Sequence[float] = AUTHORS_CIFAR_STD) -> EvalTransform:
    """Normalisation only (no augmentation at evaluation)."""
    def transform(x):
        return normalize(to_unit(x), mean, std)
    return transform


def normalise_only_train_transform(mean: Sequence[float], std: Sequence[float]) -> TrainTransform:
    """Training transform without augmentation: normalisation only (the key is unused)."""
    evaluate = cifar_eval_transform(mean, std)

    def transform(x, key):
        del key
        return evaluate(x)
    return transform


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of images ``x`` [n, H, W, C] on the [0, 1] scale that
    ``to_unit`` gives (uint8 / 255; float as it is), in float64 over chunks of images (no
    float copy of the whole array). A channel with std 0 (constant) gets std 1."""
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    c = x.shape[-1]
    total, total_sq, count = np.zeros(c), np.zeros(c), 0
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk].reshape(-1, c).astype(np.float64) / scale
        total += part.sum(0)
        total_sq += np.square(part).sum(0)
        count += len(part)
    mean = total / max(count, 1)
    var = np.maximum(total_sq / max(count, 1) - np.square(mean), 0.0)
    std = np.sqrt(var)
    std = np.where(std > 1e-8, std, 1.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _check_constants(name: str, values, channels: int) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} = {values!r}: must be a sequence of numbers, one per "
                         "channel") from None
    if len(out) != channels:
        raise ValueError(f"{name} = {tuple(values)!r} has {len(out)} values but the images "
                         f"have {channels} channel{'s' * (channels != 1)}")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} = {tuple(values)!r}: every value must be finite")
    return out


def image_transforms(x: np.ndarray, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, augment: bool | None = None
                     ) -> tuple[TrainTransform, EvalTransform, dict]:
    """(train_transform, eval_transform, resolved) for images ``x`` [n, H, W, C] (the
    training split), from the config's ``data.mean`` / ``data.std`` / ``data.augment``.

    Defaults (a value of None): for 32×32 RGB images (CIFAR-like) ``CIFAR10_MEAN`` and
    ``AUTHORS_CIFAR_STD`` (the authors' constants: real CIFAR-10 from files reproduces the
    paper) and ``augment = True`` (crop 32 with 4-pixel padding + horizontal flip); for
    any other shape the training split's own per-channel mean and std (``channel_stats``)
    and ``augment = False``. ``resolved`` holds the values used (the eval transform also
    carries ``mean``/``std`` as its ``normalisation`` attribute). A ``mean``/``std`` whose
    length is not the channel count, or a std ≤ 0, is a ValueError.
    """
    h, w, c = x.shape[1:]
    cifar_like = (h, w, c) == (32, 32, 3)
    if mean is None or std is None:
        if cifar_like:
            stats = (CIFAR10_MEAN, AUTHORS_CIFAR_STD)
        else:
            stats = channel_stats(x)
        mean = stats[0] if mean is None else mean
        std = stats[1] if std is None else std
    mean = _check_constants("config.data.mean", mean, c)
    std = _check_constants("config.data.std", std, c)
    if not all(s > 0 for s in std):
        raise ValueError(f"config.data.std = {std!r}: every value must be > 0")
    augment = cifar_like if augment is None else bool(augment)
    train = (cifar_train_transform(mean, std) if augment
             else normalise_only_train_transform(mean, std))
    evaluate = cifar_eval_transform(mean, std)
    resolved = {"mean": mean, "std": std, "augment": augment}
    # The constants travel with the function, so that whoever stores a model (an export)
    # can record the preprocessing it needs.
    evaluate.normalisation = {"mean": mean, "std": std}
    return train, evaluate, resolved


def check_image_options(data) -> None:
    """config.data's ``mean``, ``std`` (None or per-channel numbers, std > 0, as many as
    the mean) and ``augment`` (None or a bool); the channel count is checked on load."""
    for field in ("mean", "std"):   # per-channel normalisation; None = the data's default
        v = data.get(field)
        if v is not None and (not isinstance(v, (tuple, list)) or not v or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                and (field == "mean" or s > 0) for s in v)):
            checks.fail(field, v, "must be None or a non-empty tuple of finite numbers, "
                        "one per channel" + (", each > 0" if field == "std" else ""))
    if data.get("mean") is not None and data.get("std") is not None \
            and len(data["mean"]) != len(data["std"]):
        checks.fail("std", tuple(data["std"]), f"must have as many values as data.mean = "
                    f"{tuple(data['mean'])!r}")
    if data.get("augment") is not None and not isinstance(data["augment"], bool):
        checks.fail("augment", data["augment"], "must be True, False or None (the dataset's "
                    "default)")
