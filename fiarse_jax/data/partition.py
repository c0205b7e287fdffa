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


def _check_clients(num_clients: int, n: int, what: str) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be ≥ 1, got {num_clients!r}")
    if num_clients > n:
        raise ValueError(f"{num_clients} clients exceed the {n} samples available for {what}")


def iid_partition(labels: np.ndarray, num_clients: int, *,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """Uniform random split (the IID control): near-equal parts whose sizes differ by at
    most 1, one sorted index array per client, every sample used exactly once.

    ``labels`` only fixes the number of samples; the split ignores them.
    """
    n = len(np.asarray(labels))
    _check_clients(num_clients, n, "an iid split")
    return [np.sort(p) for p in np.array_split(rng.permutation(n), num_clients)]


def shard_partition(labels: np.ndarray, num_clients: int, classes_per_client: int, *,
                    rng: np.random.Generator, allow_repeats: bool = False) -> list[np.ndarray]:
    """The "pathological" non-IID split of McMahan et al. (2017): sort by label, cut into
    ``num_clients · classes_per_client`` equal shards, deal each client
    ``classes_per_client`` shards at random. Every client gets exactly
    ``shard_size · classes_per_client`` samples, ``shard_size = n // (num_clients ·
    classes_per_client)``.

    * Remainder: the ``n mod (num_clients · classes_per_client)`` samples that do not fill
      a shard are chosen at random (not the tail of the last class) and left unused, so
      every sample is used at most once, exactly once when the division is exact.
    * Within a class the order is random, so a shard is a random subset of its class.
    * Repeats: a uniform deal (McMahan et al.; ``allow_repeats=True``) often gives a
      client two shards of one class (≈ 10% of clients at 100 clients × 2 shards, 10
      classes), so it holds fewer classes than asked. By default the random deal is
      repaired: while a client holds two shards with the same majority label, one of them
      is swapped with a shard of another client, chosen uniformly among those that leave neither
      client with a repeat. This is best effort: when no such swap exists (e.g. a class has
      more shards than there are clients) the repeat stays.
    * A shard straddling a class boundary holds two classes. Hence a client holds at most
      ``classes_per_client`` classes when class sizes are multiples of the shard size
      (exactly that many when the repair succeeds), and at most
      ``2 · classes_per_client`` in general.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if classes_per_client < 1:
        raise ValueError(f"classes_per_client must be ≥ 1, got {classes_per_client!r}")
    _check_clients(num_clients, n, "a shard split")
    num_shards = num_clients * classes_per_client
    if num_shards > n:
        raise ValueError(f"{num_clients} clients × {classes_per_client} shards = {num_shards} "
                         f"shards exceed the {n} samples available")
    shard_size = n // num_shards
    kept = rng.permutation(n)[:num_shards * shard_size]            # drops a random remainder
    kept = kept[np.argsort(labels[kept], kind="stable")]           # by label, random within
    shards = kept.reshape(num_shards, shard_size)
    deal = rng.permutation(num_shards).reshape(num_clients, classes_per_client)
    if not allow_repeats and classes_per_client > 1:
        code = np.unique(labels, return_inverse=True)[1].reshape(-1)  # any label values
        major = np.array([np.bincount(sl).argmax() for sl in code[shards]])
        _repair_repeats(deal, major, rng)
    return [np.sort(shards[d].ravel()) for d in deal]


def _repair_repeats(deal: np.ndarray, major: np.ndarray, rng: np.random.Generator) -> None:
    """In place: swap shards between clients until no client holds two shards of one
    (majority) class, or no repeat can be fixed by a single swap."""
    cls = major[deal]                                   # [clients, slots] shard classes
    earlier = np.tril(np.ones((cls.shape[1],) * 2, bool), -1)
    stuck = np.zeros(cls.shape, bool)
    while True:
        repeat = ((cls[:, :, None] == cls[:, None, :]) & earlier).any(-1)  # seen before in row
        todo = np.argwhere(repeat & ~stuck)
        if len(todo) == 0:
            return
        k, i = todo[rng.integers(len(todo))]
        a, others = cls[k, i], np.delete(cls[k], i)
        # partner (k2, j): k2 lacks class a, and its shard's class b is new to client k
        ok = ~(cls == a).any(1, keepdims=True) & ~np.isin(cls, others) & (cls != a)
        ok[k] = False
        cand = np.argwhere(ok)
        if len(cand) == 0:
            stuck[k, i] = True
            continue
        k2, j = cand[rng.integers(len(cand))]
        deal[k, i], deal[k2, j] = deal[k2, j], deal[k, i]
        cls[k, i], cls[k2, j] = cls[k2, j], cls[k, i]


def _allocate_counts(props: np.ndarray, n: int, avail: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """Integer counts [clients, classes] with every row summing to ``n`` and every column
    at most ``avail``; row k drawn from Multinomial(n, props[k]), then over-demanded
    classes are trimmed and the trimmed units re-drawn within each client's mix over the
    classes that still have room (see ``balanced_dirichlet_partition``)."""
    counts = np.stack([rng.multinomial(n, p) for p in props])
    for _ in range(props.shape[1] + 1):
        excess = counts.sum(0) - avail
        over = np.flatnonzero(excess > 0)
        if len(over) == 0:
            return counts
        freed = np.zeros(len(counts), np.int64)
        for c in over:  # take the excess from the class's holders, ∝ their holdings
            take = rng.multivariate_hypergeometric(counts[:, c], int(excess[c]))
            counts[:, c] -= take
            freed += take
        room = avail - counts.sum(0)
        open_ = room > 0
        for k in np.flatnonzero(freed):
            w = np.where(open_, props[k], 0.0)
            if w.sum() <= 0:  # the client's mix has (numerically) no mass left: fill by room
                w = np.where(open_, room, 0).astype(float)
            counts[k] += rng.multinomial(freed[k], w / w.sum())
    # Classes that overflow are full afterwards and never receive again, so at most
    # num_classes rounds are needed; reaching here would be a bug.
    raise AssertionError("balanced allocation did not converge")  # pragma: no cover


def _take(labels: np.ndarray, classes: np.ndarray, counts: np.ndarray,
          rng: np.random.Generator) -> list[np.ndarray]:
    """Hand out disjoint random indices of each class according to ``counts``."""
    parts: list[list[np.ndarray]] = [[] for _ in range(len(counts))]
    for j, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for k, chunk in enumerate(np.split(idx, np.cumsum(counts[:, j]))[:-1]):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def balanced_dirichlet_partition(train_labels: np.ndarray, test_labels: np.ndarray,
                                 num_clients: int, alpha: float, *, n_train: int, n_test: int,
                                 rng: np.random.Generator
                                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The FIARSE paper's CIFAR federation: equal-size clients with Dirichlet label mixes.

    Client k draws its own class mix p_k ~ Dir(α·1) over the classes seen in either split
    (this is the first draw from ``rng``: ``rng.dirichlet(np.full(C, alpha),
    size=num_clients)``, C = ``len(np.union1d(train_labels, test_labels))``, so a caller
    can reproduce the mixes). It then gets exactly ``n_train`` indices into the train
    split and ``n_test`` into the separate test split, both with class counts drawn from
    Multinomial(·, p_k): the test labels follow the client's own train mix, as the paper
    describes (the authors' code draws the test mixes independently). Within a split no
    index goes to two clients. Paper values: 100 clients, α = 0.3, n_train = 500,
    n_test = 100 from CIFAR's 50,000 / 10,000 (both splits fully used).

    Allocation under per-class availability (each split separately): all clients' counts
    are drawn first; while some class is over-demanded, its excess is taken back from its
    holders in proportion to what they hold (multivariate hypergeometric), and each client
    re-draws the units it lost from Multinomial over the classes that still have room,
    with its own p_k restricted to them. Overflowing classes end full and receive nothing
    more, so this ends within C rounds. When demand stays below availability nothing is
    moved and counts are exactly Multinomial(n, p_k); near full subscription the mixes
    bend towards the available classes, spread over all clients rather than the last ones.
    """
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha!r}")
    if num_clients < 1 or n_train < 1 or n_test < 0:
        raise ValueError(f"need num_clients ≥ 1, n_train ≥ 1, n_test ≥ 0; got "
                         f"num_clients={num_clients}, n_train={n_train}, n_test={n_test}")
    for name, n, labels in (("n_train", n_train, train_labels), ("n_test", n_test, test_labels)):
        if num_clients * n > len(labels):
            raise ValueError(f"num_clients={num_clients} × {name}={n} = {num_clients * n} "
                             f"exceeds the {len(labels)} samples of the "
                             f"{name.split('_')[1]} split")
    classes = np.union1d(train_labels, test_labels)
    props = rng.dirichlet(np.full(len(classes), float(alpha)), size=num_clients)
    out = []
    for n, labels in ((n_train, train_labels), (n_test, test_labels)):
        avail = np.array([np.sum(labels == c) for c in classes])
        out.append(_take(labels, classes, _allocate_counts(props, n, avail, rng), rng))
    return out[0], out[1]
