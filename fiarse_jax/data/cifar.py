"""CIFAR-10/100 from the TFDS source (``fiarse_jax.data.tfds``) with its separate test split
and the CIFAR train/eval transforms (``fiarse_jax.data.augment``), and its config check."""
from __future__ import annotations

import numpy as np

from fiarse_jax.data import augment as augment_lib
from fiarse_jax.data import tfds as tfds_data
from fiarse_jax.data.types import Dataset

#: dataset name -> (TFDS name, number of classes, host the download comes from)
TFDS_DATASETS = {
    "cifar10": ("cifar10", 10, "www.cs.toronto.edu"),
    "cifar100": ("cifar100", 100, "www.cs.toronto.edu"),
}


def _images_labels(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    y = np.asarray([int(r["label"]) for r in records], np.int32)
    return x, y


def load_cifar(name: str, *, data_dir: str | None = None, download: bool = False,
               mock_examples: int = 0, mean=None, std=None, augment: bool | None = None
               ) -> Dataset:
    """CIFAR-10 or CIFAR-100 as a ``Dataset`` with its separate test split and the
    CIFAR train/eval transforms.

    ``mean`` / ``std`` (per channel) and ``augment`` (crop 32 with 4-pixel padding + flip)
    are config.data's fields; None gives ``augment.image_transforms``'s defaults for
    32×32 RGB: CIFAR-10's mean, the authors' std ``AUTHORS_CIFAR_STD`` (one set of
    constants for both datasets, as in the authors' code) and augmentation on."""
    tfds_name, num_classes, host = TFDS_DATASETS[name]
    train, test = tfds_data.read_tfds_splits(name, tfds_name, host, splits=("train", "test"),
                                             data_dir=data_dir, download=download,
                                             mock_examples=mock_examples)
    x, y = _images_labels(train)
    tx, ty = _images_labels(test)
    if mock_examples > 0:   # mock labels are random over int64; fold them into the classes
        y, ty = y % num_classes, ty % num_classes
    train_transform, eval_transform, _ = augment_lib.image_transforms(x, mean, std, augment)
    return Dataset(x=x, y=y, num_classes=num_classes, test_x=tx, test_y=ty,
                   train_transform=train_transform, eval_transform=eval_transform)


def load_cifar10(**options) -> Dataset:
    """``load_cifar("cifar10", **options)``."""
    return load_cifar("cifar10", **options)


def load_cifar100(**options) -> Dataset:
    """``load_cifar("cifar100", **options)``."""
    return load_cifar("cifar100", **options)


def check_config(data) -> None:
    """config.data's fields for CIFAR: the TFDS source's and the image options."""
    tfds_data.check_source_options(data)
    augment_lib.check_image_options(data)
