"""Datasets by name, federated into per-client arrays the engine can index.

Layout: training data as ``ClientData`` stacked over *all* clients and padded to
the largest client (memory O(dataset), not O(clients × steps × batch)); a
round gathers its sampled clients' rows on device. Test data stays flat with a
``client`` id per sample, so the same arrays serve the global test set (all
clients' test samples) and each client's local test split.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fiarse_jax.data.partition import dirichlet_partition, train_test_split


class ClientData(NamedTuple):
    """One client's padded rows (or, stacked, many clients' with a leading axis)."""

    x: jax.Array      # [n_max, ...]
    y: jax.Array      # [n_max]
    count: jax.Array  # [] number of valid rows (≥ 1)


class Dataset(NamedTuple):
    x: np.ndarray            # [n, H, W, C] float32
    y: np.ndarray            # [n] int32
    num_classes: int


class FederatedData(NamedTuple):
    train: ClientData        # leading axis: every client
    test_x: jnp.ndarray      # [t, ...] all clients' test samples
    test_y: jnp.ndarray      # [t]
    test_client: jnp.ndarray  # [t] owning client id
    num_classes: int
    train_sizes: np.ndarray  # [num_clients]
    test_sizes: np.ndarray   # [num_clients]


def load_digits() -> Dataset:
    """scikit-learn's digits: 1,797 real 8×8 handwritten digits shipped in the wheel."""
    from sklearn.datasets import load_digits as _load
    d = _load()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    return Dataset(x=x, y=d.target.astype(np.int32), num_classes=10)


DATASETS: dict[str, Callable[[], Dataset]] = {"digits": load_digits}


def load_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name]()


def stack_clients(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray]) -> ClientData:
    """Per-client rows padded with zeros to the largest client, plus counts."""
    n_max = max(len(p) for p in parts)
    xs = np.zeros((len(parts), n_max) + x.shape[1:], x.dtype)
    ys = np.zeros((len(parts), n_max), y.dtype)
    for i, p in enumerate(parts):
        xs[i, :len(p)], ys[i, :len(p)] = x[p], y[p]
    counts = np.array([len(p) for p in parts], np.int32)
    return ClientData(jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(counts))


def federate(ds: Dataset, *, num_clients: int, alpha: float, test_fraction: float,
             min_client_size: int, seed: int) -> FederatedData:
    """Dirichlet(α) label-skewed clients, each with its own train and test split."""
    rng = np.random.default_rng(seed)
    parts = dirichlet_partition(ds.y, num_clients, alpha, rng=rng,
                                min_size=max(min_client_size, 2))
    splits = [train_test_split(p, test_fraction, rng=rng) for p in parts]
    train_parts = [tr for tr, _ in splits]
    test_parts = [te for _, te in splits]
    test_idx = np.concatenate(test_parts)
    test_client = np.concatenate([np.full(len(t), i, np.int32) for i, t in enumerate(test_parts)])
    return FederatedData(
        train=stack_clients(ds.x, ds.y, train_parts),
        test_x=jnp.asarray(ds.x[test_idx]), test_y=jnp.asarray(ds.y[test_idx]),
        test_client=jnp.asarray(test_client), num_classes=ds.num_classes,
        train_sizes=np.array([len(p) for p in train_parts]),
        test_sizes=np.array([len(p) for p in test_parts]))
