"""CIFAR-10/100 (and the shared TFDS plumbing of every TFDS dataset) into host NumPy arrays.

Route: ``tfds.data_source`` (ArrayRecord random access), which reads prepared data
without TensorFlow. Preparing the data the first time (``download=True``) is
TFDS's ``download_and_prepare``, which needs internet (and, for CIFAR's image
encoding, TensorFlow on some TFDS versions: prepare once on a machine that has it,
e.g. Colab, then point ``data_dir`` at the result). Install with
``pip install -e ".[tfds]"``.

Absent data fails fast: without ``download`` a missing dataset is one clear error
naming ``data_dir``; with it, a 5-second connection check runs before TFDS starts a
download that would otherwise hang for minutes on an offline machine.

``mock_examples > 0`` reads ``tfds.testing.mock_data`` instead (random images of the
right shapes, no files): the smoke config and the tests use it.

``read_tfds_splits`` is that route for any TFDS dataset (the AG News loader,
``fiarse_jax.data.text``, uses it too).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import numpy as np

from fiarse_jax import hub
from fiarse_jax.data import augment as augment_lib
from fiarse_jax.data.federated import Dataset

#: dataset name -> (TFDS name, number of classes, host the download comes from)
TFDS_DATASETS = {
    "cifar10": ("cifar10", 10, "www.cs.toronto.edu"),
    "cifar100": ("cifar100", 100, "www.cs.toronto.edu"),
}


class DataUnavailable(RuntimeError):
    """The dataset is neither on disk nor downloadable; the message says how to provide it."""


def _import_tfds(what: str = "CIFAR", extra: str = "tfds"):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataUnavailable(
            f"{what} needs tensorflow-datasets: pip install -e \".[{extra}]\"") from None
    return tfds


_online = hub.reachable   # a module name of its own, so tests can stand in for the network


def default_data_dir() -> str:
    """TFDS's default data directory (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
    tfds = _import_tfds("TFDS data")
    return tfds.core.constants.get_default_data_dir()


def _ensure_prepared(tfds, name: str, tfds_name: str, host: str, data_dir: str | None,
                     download: bool) -> None:
    """Return if ``tfds_name`` is prepared; else download it, or fail fast saying how."""
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    if builder.is_prepared():
        return
    where = builder.data_dir
    if not download:
        raise DataUnavailable(
            f"{name} is not prepared under config.data.data_dir = {data_dir!r} "
            f"(looked in {where}). Set --config.data.download=True on a machine with "
            "internet, or copy a prepared TFDS directory there.")
    if not _online(host):
        raise DataUnavailable(
            f"{name} is not prepared under {where} and {host} cannot be reached "
            "(no internet?). Prepare it on a machine with internet "
            f"(tfds.builder('{tfds_name}', data_dir=...).download_and_prepare(file_format="
            "'array_record')) and point config.data.data_dir at it.")
    builder.download_and_prepare(file_format="array_record")


def _read_records(source) -> list[dict]:
    n = len(source)
    try:
        return list(source.__getitems__(list(range(n))))
    except Exception:  # noqa: BLE001 — some sources (mock data) lack batched reads
        return [source[i] for i in range(n)]


def read_tfds_splits(name: str, tfds_name: str, host: str, *, splits: Sequence[str],
                     data_dir: str | None = None, download: bool = False,
                     mock_examples: int = 0, extra: str = "tfds") -> list[list[dict]]:
    """Every record (a dict of NumPy values) of each split of ``tfds_name``, via
    ``tfds.data_source``; ``mock_examples > 0`` reads ``tfds.testing.mock_data``.

    ``name`` (the config's dataset name) and ``host`` (where the download comes from)
    go into the fail-fast messages; ``extra`` is the pip extra named when TFDS is missing.
    """
    tfds = _import_tfds(name, extra)
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    if mock_examples > 0:
        ctx = tfds.testing.mock_data(num_examples=int(mock_examples))
    else:
        ctx = contextlib.nullcontext()
        _ensure_prepared(tfds, name, tfds_name, host, data_dir, download)
    with ctx:
        return [_read_records(tfds.data_source(tfds_name, split=s, data_dir=data_dir,
                                               download=False))
                for s in splits]


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
    train, test = read_tfds_splits(name, tfds_name, host, splits=("train", "test"),
                                   data_dir=data_dir, download=download,
                                   mock_examples=mock_examples)
    x, y = _images_labels(train)
    tx, ty = _images_labels(test)
    if mock_examples > 0:   # mock labels are random over int64; fold them into the classes
        y, ty = y % num_classes, ty % num_classes
    train_transform, eval_transform, _ = augment_lib.image_transforms(x, mean, std, augment)
    return Dataset(x=x, y=y, num_classes=num_classes, test_x=tx, test_y=ty,
                   train_transform=train_transform, eval_transform=eval_transform)
