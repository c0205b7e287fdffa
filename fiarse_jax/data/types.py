"""The data types: one client's padded rows (``ClientData``), a dataset in host memory
(``Dataset``) and a dataset federated over clients (``FederatedData``).

Layout: training data as ``ClientData`` stacked over *all* clients and padded to
the largest client (memory O(dataset), not O(clients × steps × batch)); a
round gathers its sampled clients' rows on device. Test data stays flat with a
``client`` id per sample, so the same arrays serve the global test set (all
clients' test samples) and each client's local test split.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


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

    ``global_x``/``global_y``: the test set the global numbers are measured on, when it
    is not the clients' (``eval.global_order = "dataset"``): the dataset's test split
    when the partition leaves it whole (``balanced_dirichlet``: clients' local tests are
    draws from it), else the pooled clients' test samples in one fixed mixed order.
    None (``"clients"``, the authors' global set, and hand-built data): every client's
    test split concatenated in client order, ``test_x``/``test_y`` themselves.
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
