"""Federating a ``Dataset``: the partitions (``PARTITIONS``), ``federate`` (clients' train
rows, local test samples and the global test set) and ``stack_clients`` (the padded
per-client layout the engine indexes; see ``fiarse_jax.data.types``).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fiarse_jax.data.partition import (
    balanced_dirichlet_partition,
    dirichlet_partition,
    iid_partition,
    shard_partition,
    train_test_split,
)
from fiarse_jax.data.types import ClientData, Dataset, FederatedData

#: config.data.partition: how ``federate`` splits the data over clients.
PARTITIONS = ("dirichlet", "balanced_dirichlet", "iid", "shards")

#: config.eval.global_order: what the global test set is, in which order (``federate``).
GLOBAL_ORDERS = ("clients", "dataset")


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
             min_client_size: int, seed: int, partition: str = "dirichlet",
             n_train: int = 500, n_test: int = 100, classes_per_client: int = 2,
             global_order: str = "clients") -> FederatedData:
    """Split ``ds`` over ``num_clients`` clients, each with its own train and test data.

    * ``dirichlet``: Dirichlet(α) label skew over all samples (a separate test split is
      pooled in), then each client's samples split ``test_fraction`` for its test.
    * ``iid`` / ``shards``: uniform split / ``classes_per_client`` label shards, then the
      same per-client test split.
    * ``balanced_dirichlet`` (the paper's CIFAR federation): every client exactly
      ``n_train`` samples of the train split and ``n_test`` of the test split, both
      following the client's own Dirichlet(α) label mix; needs a separate test split.

    Each client's test split is shuffled once (a seeded stream of its own), as the
    authors' partition leaves it; it is scored in that order.

    ``global_order``: the global test set. ``"clients"`` (the authors'): every client's
    test split concatenated in client order, so with
    static BN a global batch lies inside one client's label-skewed split, as in the
    paper's "Global" column. ``"dataset"``: the dataset's test split in its own order
    (``balanced_dirichlet``) or the pooled clients' test samples in one fixed mixed order:
    i.i.d.-looking batches.
    """
    if global_order not in GLOBAL_ORDERS:
        raise ValueError(f"eval.global_order = {global_order!r}: must be one of {GLOBAL_ORDERS}")
    rng = np.random.default_rng(seed)
    if partition == "balanced_dirichlet":
        if ds.test_x is None:
            raise ValueError("partition 'balanced_dirichlet' needs a dataset with a separate "
                             "test split (cifar10, cifar100)")
        train_parts, test_parts = balanced_dirichlet_partition(
            ds.y, ds.test_y, num_clients, alpha, n_train=n_train, n_test=n_test, rng=rng)
        x, y, tx, ty = ds.x, ds.y, ds.test_x, ds.test_y
        gx, gy = ds.test_x, ds.test_y
    else:
        x, y = ds.x, ds.y
        if ds.test_x is not None:
            x, y = np.concatenate([ds.x, ds.test_x]), np.concatenate([ds.y, ds.test_y])
        if partition == "dirichlet":
            parts = dirichlet_partition(y, num_clients, alpha, rng=rng,
                                        min_size=max(min_client_size, 2))
        elif partition == "iid":
            parts = iid_partition(y, num_clients, rng=rng)
        elif partition == "shards":
            parts = shard_partition(y, num_clients, classes_per_client, rng=rng)
        else:
            raise ValueError(f"unknown partition {partition!r}; expected one of {PARTITIONS}")
        splits = [train_test_split(p, test_fraction, rng=rng) for p in parts]
        train_parts = [tr for tr, _ in splits]
        test_parts = [te for _, te in splits]
        tx, ty = x, y
        # In one fixed mixed order (seed 0), not the dataset's: a dataset stored class by
        # class (an image folder) would give single-class batches (static BN).
        pooled = np.sort(np.concatenate(test_parts))
        pooled = pooled[np.random.default_rng(0).permutation(len(pooled))]
        gx, gy = x[pooled], y[pooled]
    # Each client's test split in one shuffled order, as the authors' partition leaves it
    # (a batch of a split stored class by class would hold one class); its own stream, so
    # the partition's draws are unchanged.
    order = np.random.default_rng([seed, 7])
    test_parts = [order.permutation(t) for t in test_parts]
    test_idx = np.concatenate(test_parts)
    test_client = np.concatenate([np.full(len(t), i, np.int32) for i, t in enumerate(test_parts)])
    if global_order == "clients":   # the local test arrays themselves: global_test() gives them
        gx = gy = None
    return FederatedData(
        train=stack_clients(x, y, train_parts),
        test_x=jnp.asarray(tx[test_idx]), test_y=jnp.asarray(ty[test_idx]),
        test_client=jnp.asarray(test_client), num_classes=ds.num_classes,
        train_sizes=np.array([len(p) for p in train_parts]),
        test_sizes=np.array([len(p) for p in test_parts]),
        global_x=None if gx is None else np.asarray(gx),
        global_y=None if gy is None else np.asarray(gy, np.int32))
