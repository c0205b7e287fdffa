"""Partitioners and the per-client layout."""
import numpy as np
import pytest

from fiarse_jax.data import dirichlet_partition, federate, load_digits, stack_clients, train_test_split


def label_skew(parts, labels, num_classes=10):
    """Mean total-variation distance between client label mixes and the global mix."""
    glob = np.bincount(labels, minlength=num_classes) / len(labels)
    return np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / len(p) - glob).sum()
                    for p in parts])


def test_dirichlet_partition_uses_every_sample_once_and_is_seeded():
    labels = np.random.default_rng(0).integers(0, 10, 2000)
    parts = dirichlet_partition(labels, 20, 0.5, rng=np.random.default_rng(1), min_size=10)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(2000))
    assert min(len(p) for p in parts) >= 10
    again = dirichlet_partition(labels, 20, 0.5, rng=np.random.default_rng(1), min_size=10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_smaller_alpha_means_more_label_skew():
    labels = np.random.default_rng(0).integers(0, 10, 5000)
    skew = {a: label_skew(dirichlet_partition(labels, 20, a, rng=np.random.default_rng(2)), labels)
            for a in (0.1, 1.0, 100.0)}
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[100.0] < 0.1 and skew[0.1] > 0.5


def test_dirichlet_partition_errors():
    labels = np.zeros(10, int)
    with pytest.raises(ValueError, match="alpha must be > 0, got -1"):
        dirichlet_partition(labels, 2, -1, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="exceeds the 10 samples"):
        dirichlet_partition(labels, 5, 1.0, rng=np.random.default_rng(0), min_size=3)


def test_train_test_split_disjoint_and_nonempty():
    idx = np.arange(100, 107)
    tr, te = train_test_split(idx, 0.2, rng=np.random.default_rng(0))
    assert len(te) == 1 and len(tr) == 6
    assert sorted(np.concatenate([tr, te]).tolist()) == idx.tolist()
    tr, te = train_test_split(np.array([4, 9]), 0.9, rng=np.random.default_rng(0))
    assert len(tr) == 1 and len(te) == 1


def test_stack_clients_pads_and_counts():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10, dtype=np.int32)
    cd = stack_clients(x, y, [np.array([1, 2]), np.array([3, 4, 5, 6])])
    assert cd.x.shape == (2, 4, 1)
    np.testing.assert_array_equal(np.asarray(cd.count), [2, 4])
    np.testing.assert_array_equal(np.asarray(cd.y[0]), [1, 2, 0, 0])
    np.testing.assert_array_equal(np.asarray(cd.x[1, :, 0]), [3, 4, 5, 6])


def test_federated_digits_layout():
    ds = load_digits()
    assert ds.x.shape == (1797, 8, 8, 1) and ds.x.max() <= 1.0 and ds.num_classes == 10
    fd = federate(ds, num_clients=30, alpha=0.5, test_fraction=0.2, min_client_size=10, seed=0)
    assert fd.train_sizes.sum() + fd.test_sizes.sum() == 1797
    assert fd.test_sizes.min() >= 1 and fd.train_sizes.min() >= 1
    np.testing.assert_array_equal(np.asarray(fd.train.count), fd.train_sizes)
    np.testing.assert_array_equal(np.bincount(np.asarray(fd.test_client), minlength=30), fd.test_sizes)
    # A client's test labels come from its own samples: they are a subset of its label set
    # whenever the client has ≥ 5 test samples (a loose but real check of "own mix").
    c = int(np.argmax(fd.test_sizes))
    own_train = set(np.asarray(fd.train.y[c, :fd.train_sizes[c]]).tolist())
    own_test = set(np.asarray(fd.test_y)[np.asarray(fd.test_client) == c].tolist())
    assert len(own_test - own_train) <= 1
