"""Datasets by name, federated into per-client arrays the engine can index.

Layout: training data as ``ClientData`` stacked over *all* clients and padded to
the largest client (memory O(dataset), not O(clients × steps × batch)); a
round gathers its sampled clients' rows on device. Test data stays flat with a
``client`` id per sample, so the same arrays serve the global test set (all
clients' test samples) and each client's local test split.

Datasets (``config.data.name``; ``LOADER_OPTIONS`` lists the config.data fields each
loader takes): ``digits`` (scikit-learn's, in the wheel), ``cifar10`` / ``cifar100``
(TFDS, ``fiarse_jax.data.tfds``), ``ag_news`` (token ids, ``fiarse_jax.data.text``), and
two from the user's own files (``fiarse_jax.data.files``), which need only ``data_dir``:

* ``image_folder``: ``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*`` PNG/JPEG
  images (torchvision's ImageFolder layout; classes sorted by name), decoded once and
  cached as uint8 arrays beside the data (or in ``~/.cache/fiarse_jax``).
* ``arrays``: ``data_dir`` is an .npz file with ``x_train``, ``y_train``, ``x_test``,
  ``y_test`` (x [n, H, W, C] or [n, H, W]; integer labels).

The image datasets other than digits take ``mean``, ``std`` (per channel) and ``augment``
(crop-pad-4 + flip); None picks the default: for 32×32 RGB images CIFAR-10's mean, the
authors' std (``augment.AUTHORS_CIFAR_STD``) and augmentation on, otherwise the training
split's own per-channel mean/std and no augmentation (``augment.image_transforms``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fiarse_jax.data.partition import (
    balanced_dirichlet_partition,
    dirichlet_partition,
    iid_partition,
    shard_partition,
    train_test_split,
)


class ClientData(NamedTuple):
    """One client's padded rows (or, stacked, many clients' with a leading axis)."""

    x: jax.Array      # [n_max, ...]
    y: jax.Array      # [n_max]
    count: jax.Array  # [] number of valid rows (≥ 1)


class Dataset(NamedTuple):
    """A labelled image dataset in host memory, with its on-device transforms.

    ``test_x``/``test_y``: a separate test split (CIFAR), or None (digits: clients'
    test splits are carved from ``x``). ``train_transform(x, key)`` runs on every
    training batch inside the client step (augmentation); ``eval_transform(x)`` on
    evaluation batches. None means the stored arrays are used as they are.
    ``model_options``: model fields the data fixes (a tokenizer's ``vocab_size`` and
    ``pad_token_id``, the sequence length); ``build_run`` passes them to the model.
    """

    x: np.ndarray            # [n, H, W, C] float32 or uint8 images, or [n, L] int32 token ids
    y: np.ndarray            # [n] int32
    num_classes: int
    test_x: np.ndarray | None = None
    test_y: np.ndarray | None = None
    train_transform: Callable | None = None
    eval_transform: Callable | None = None
    model_options: dict | None = None


class FederatedData(NamedTuple):
    """Clients' training rows, their local test samples, and the global test set.

    ``global_x``/``global_y``: the test set the global numbers are measured on, in its
    own order: the dataset's test split when the partition leaves it whole
    (``balanced_dirichlet``: clients' local tests are draws from it), else the pooled
    clients' test samples in one fixed mixed order (the same set in the same order
    whoever holds which sample).
    None (hand-built data): the pooled ``test_x`` in client order.
    """

    train: ClientData        # leading axis: every client
    test_x: jnp.ndarray      # [t, ...] all clients' test samples, client by client
    test_y: jnp.ndarray      # [t]
    test_client: jnp.ndarray  # [t] owning client id
    num_classes: int
    train_sizes: np.ndarray  # [num_clients]
    test_sizes: np.ndarray   # [num_clients]
    global_x: np.ndarray | None = None   # [g, ...] the global test set
    global_y: np.ndarray | None = None   # [g]

    def global_test(self) -> tuple:
        """(x, y) of the global test set (see the class docstring)."""
        if self.global_x is None:
            return self.test_x, self.test_y
        return self.global_x, self.global_y


def load_digits() -> Dataset:
    """scikit-learn's digits: 1,797 real 8×8 handwritten digits shipped in the wheel."""
    from sklearn.datasets import load_digits as _load
    d = _load()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    return Dataset(x=x, y=d.target.astype(np.int32), num_classes=10)


def _cifar(name: str) -> Callable[..., Dataset]:
    def load(**options) -> Dataset:
        from fiarse_jax.data.tfds import load_cifar  # optional dependency, imported on use
        return load_cifar(name, **options)
    return load


def _ag_news(**options) -> Dataset:
    from fiarse_jax.data.text import load_ag_news  # optional dependency, imported on use
    return load_ag_news(**options)


def _image_folder(**options) -> Dataset:
    from fiarse_jax.data.files import load_image_folder  # imported on use (Pillow)
    return load_image_folder(**options)


def _arrays(**options) -> Dataset:
    from fiarse_jax.data.files import load_arrays
    return load_arrays(**options)


#: name -> loader(**options); options come from config.data (data_dir, download, ...).
DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits, "cifar10": _cifar("cifar10"), "cifar100": _cifar("cifar100"),
    "ag_news": _ag_news, "image_folder": _image_folder, "arrays": _arrays}
#: config.data fields (of an image dataset) that set its normalisation and augmentation.
IMAGE_OPTIONS = ("mean", "std", "augment")
#: config.data fields each loader takes.
LOADER_OPTIONS = {"digits": (),
                  "cifar10": ("data_dir", "download", "mock_examples") + IMAGE_OPTIONS,
                  "cifar100": ("data_dir", "download", "mock_examples") + IMAGE_OPTIONS,
                  "ag_news": ("data_dir", "download", "mock_examples", "tokenizer",
                              "vocab_size", "max_length"),
                  "image_folder": ("data_dir",) + IMAGE_OPTIONS,
                  "arrays": ("data_dir",) + IMAGE_OPTIONS}
#: Datasets read from the user's files: config.data.data_dir must name them.
FILE_DATASETS = ("image_folder", "arrays")
PARTITIONS = ("dirichlet", "balanced_dirichlet", "iid", "shards")


def load_dataset(name: str, **options) -> Dataset:
    """The dataset ``name``; ``options`` are passed to its loader (see LOADER_OPTIONS)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name](**options)


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
             n_train: int = 500, n_test: int = 100, classes_per_client: int = 2) -> FederatedData:
    """Split ``ds`` over ``num_clients`` clients, each with its own train and test data.

    * ``dirichlet``: Dirichlet(α) label skew over all samples (a separate test split is
      pooled in), then each client's samples split ``test_fraction`` for its test.
    * ``iid`` / ``shards``: uniform split / ``classes_per_client`` label shards, then the
      same per-client test split.
    * ``balanced_dirichlet`` (the paper's CIFAR federation): every client exactly
      ``n_train`` samples of the train split and ``n_test`` of the test split, both
      following the client's own Dirichlet(α) label mix; needs a separate test split.
    """
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
    test_idx = np.concatenate(test_parts)
    test_client = np.concatenate([np.full(len(t), i, np.int32) for i, t in enumerate(test_parts)])
    return FederatedData(
        train=stack_clients(x, y, train_parts),
        test_x=jnp.asarray(tx[test_idx]), test_y=jnp.asarray(ty[test_idx]),
        test_client=jnp.asarray(test_client), num_classes=ds.num_classes,
        train_sizes=np.array([len(p) for p in train_parts]),
        test_sizes=np.array([len(p) for p in test_parts]),
        global_x=np.asarray(gx), global_y=np.asarray(gy, np.int32))
