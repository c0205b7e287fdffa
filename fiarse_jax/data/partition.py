"""Seeded partitioners: how a labelled dataset is split across simulated clients."""
from __future__ import annotations

import numpy as np


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, *,
                        rng: np.random.Generator, min_size: int = 1,
                        max_tries: int = 1000) -> list[np.ndarray]:
    """Dirichlet(α) label skew (Hsu et al., 2019): each class is spread over the
    clients in proportions drawn from Dir(α·1). Smaller α → more skew.

    Redraws until every client has at least ``min_size`` samples; returns one
    sorted index array per client (every sample used exactly once).
    """
    labels = np.asarray(labels)
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha!r}")
    if num_clients * min_size > len(labels):
        raise ValueError(f"{num_clients} clients × min_size {min_size} exceeds the "
                         f"{len(labels)} samples available")
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(o) for o in out) >= min_size:
            return out
    raise ValueError(f"could not give every one of {num_clients} clients ≥ {min_size} "
                     f"samples with alpha={alpha} in {max_tries} draws; raise alpha or "
                     "lower num_clients / min_client_size")


def train_test_split(indices: np.ndarray, test_fraction: float, *,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's samples at random; both parts keep ≥ 1 sample when n ≥ 2,
    so the test label mix follows the client's own distribution."""
    idx = rng.permutation(indices)
    n_test = int(round(test_fraction * len(idx)))
    n_test = min(max(n_test, 1), len(idx) - 1)
    return np.sort(idx[n_test:]), np.sort(idx[:n_test])
