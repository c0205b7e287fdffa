"""CIFAR-10/100 from TensorFlow Datasets, into host NumPy arrays (uint8 images).

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
"""
from __future__ import annotations

import contextlib
import os
import socket

import numpy as np

from fiarse_jax.data import augment
from fiarse_jax.data.federated import Dataset

#: dataset name -> (TFDS name, number of classes, host the download comes from)
TFDS_DATASETS = {
    "cifar10": ("cifar10", 10, "www.cs.toronto.edu"),
    "cifar100": ("cifar100", 100, "www.cs.toronto.edu"),
}


class DataUnavailable(RuntimeError):
    """The dataset is neither on disk nor downloadable; the message says how to provide it."""


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataUnavailable("CIFAR needs tensorflow-datasets: pip install -e \".[tfds]\"") from None
    return tfds


def _online(host: str, timeout: float = 5.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _read_split(source) -> tuple[np.ndarray, np.ndarray]:
    n = len(source)
    try:
        records = source.__getitems__(list(range(n)))
    except Exception:  # noqa: BLE001 — some sources (mock data) lack batched reads
        records = [source[i] for i in range(n)]
    x = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    y = np.asarray([int(r["label"]) for r in records], np.int32)
    return x, y


def load_cifar(name: str, *, data_dir: str | None = None, download: bool = False,
               mock_examples: int = 0) -> Dataset:
    """CIFAR-10 or CIFAR-100 as a ``Dataset`` with its separate test split and the
    CIFAR train/eval transforms."""
    tfds_name, num_classes, host = TFDS_DATASETS[name]
    tfds = _import_tfds()
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    if mock_examples > 0:
        ctx = tfds.testing.mock_data(num_examples=int(mock_examples))
    else:
        ctx = contextlib.nullcontext()
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        if not builder.is_prepared():
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
    with ctx:
        train = tfds.data_source(tfds_name, split="train", data_dir=data_dir, download=False)
        test = tfds.data_source(tfds_name, split="test", data_dir=data_dir, download=False)
        x, y = _read_split(train)
        tx, ty = _read_split(test)
    if mock_examples > 0:   # mock labels are random over int64; fold them into the classes
        y, ty = y % num_classes, ty % num_classes
    # One set of normalisation constants (CIFAR-10's, as listed for the authors' code) for
    # both datasets.
    return Dataset(x=x, y=y, num_classes=num_classes, test_x=tx, test_y=ty,
                   train_transform=augment.cifar_train_transform(),
                   eval_transform=augment.cifar_eval_transform())
