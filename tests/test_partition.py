"""Seeded partitioners (iid, shards, the paper's balanced Dirichlet) and partition summaries,
checked against counts computed here independently, on synthetic labels."""
import json

import numpy as np
import pytest

from fiarse_jax.data import (
    balanced_dirichlet_partition,
    format_partition_summary,
    iid_partition,
    partition_summary,
    plot_partition,
    shard_partition,
)

C = 10
# CIFAR-shaped synthetic splits: 10 classes × 5,000 train / × 1,000 test, shuffled.
TRAIN = np.random.default_rng(100).permutation(np.repeat(np.arange(C), 5000))
TEST = np.random.default_rng(101).permutation(np.repeat(np.arange(C), 1000))


def rng(seed):
    return np.random.default_rng(seed)


def counts(labels, parts):
    """[clients, classes] label counts via one scatter-add (independent of the library)."""
    out = np.zeros((len(parts), C), np.int64)
    for k, p in enumerate(parts):
        np.add.at(out[k], labels[p], 1)
    return out


def use_count(parts, n):
    """How many times each of the n samples was handed out."""
    return np.bincount(np.concatenate(parts), minlength=n)


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def tv(p, q):
    """Row-wise total-variation distance between distributions."""
    return 0.5 * np.abs(p - q).sum(-1)


# --------------------------------------------------------------------------- iid


def test_iid_partition_near_equal_exact_cover_and_seeded():
    labels = TRAIN[:1003]
    parts = iid_partition(labels, 10, rng=rng(0))
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 1003 and max(sizes) - min(sizes) <= 1
    assert (use_count(parts, 1003) == 1).all()
    assert all((np.diff(p) > 0).all() for p in parts)
    assert same(parts, iid_partition(labels, 10, rng=rng(0)))
    assert not same(parts, iid_partition(labels, 10, rng=rng(1)))
    # Uniform: with ~100 samples per client no client should be near label-pure.
    assert counts(labels, parts).max() < 40


def test_iid_partition_errors():
    with pytest.raises(ValueError, match="11 clients exceed the 10 samples"):
        iid_partition(np.zeros(10, int), 11, rng=rng(0))
    with pytest.raises(ValueError, match="num_clients must be ≥ 1"):
        iid_partition(np.zeros(10, int), 0, rng=rng(0))


# --------------------------------------------------------------------------- shards


def test_shard_partition_pure_shards():
    # 100 clients × 2 shards = 200 shards of 250: every shard lies inside one class.
    parts = shard_partition(TRAIN, 100, 2, rng=rng(0))
    assert all(len(p) == 500 for p in parts)
    assert (use_count(parts, len(TRAIN)) == 1).all()
    h = counts(TRAIN, parts)
    assert (h % 250 == 0).all()           # whole shards only
    assert ((h > 0).sum(1) == 2).all()    # repeats repaired: exactly 2 distinct classes
    assert same(parts, shard_partition(TRAIN, 100, 2, rng=rng(0)))
    assert not same(parts, shard_partition(TRAIN, 100, 2, rng=rng(1)))
    # Every class pair should occur for some client (the repair keeps the deal random).
    pairs = {tuple(np.flatnonzero(row)) for row in h}
    assert len(pairs) > 30


def test_shard_partition_allow_repeats_is_the_plain_uniform_deal():
    parts = shard_partition(TRAIN, 100, 2, rng=rng(0), allow_repeats=True)
    held = (counts(TRAIN, parts) > 0).sum(1)
    assert (use_count(parts, len(TRAIN)) == 1).all() and (held <= 2).all()
    # P(two shards of one class) = 19/199 per client: some of 100 clients have one class
    assert 1 <= (held == 1).sum() <= 25


def test_shard_partition_repeats_stay_when_unavoidable():
    parts = shard_partition(np.zeros(100, int), 5, 3, rng=rng(0))  # a single class
    assert [len(p) for p in parts] == [18] * 5 and (use_count(parts, 100) <= 1).all()


def test_shard_partition_remainder_left_unused():
    labels = np.random.default_rng(3).integers(0, C, 1037)
    parts = shard_partition(labels, 7, 3, rng=rng(0))  # 21 shards of 49, 8 left over
    assert all(len(p) == 3 * 49 for p in parts)
    used = use_count(parts, 1037)
    assert used.max() == 1 and (used == 0).sum() == 1037 - 21 * 49
    # a shard can straddle a class boundary: at most 2 classes per shard
    assert ((counts(labels, parts) > 0).sum(1) <= 6).all()
    assert ((counts(labels, parts) > 0).sum(1) >= 3).all()  # distinct majority classes
    # label-sorted shards: far more skewed than an iid split of the same sizes
    assert ((counts(labels, parts) > 0).sum(1) < C).all()


def test_shard_partition_errors():
    with pytest.raises(ValueError, match="classes_per_client must be ≥ 1"):
        shard_partition(np.zeros(10, int), 2, 0, rng=rng(0))
    with pytest.raises(ValueError, match="12 shards exceed the 10 samples"):
        shard_partition(np.zeros(10, int), 4, 3, rng=rng(0))


# ----------------------------------------------------------------- balanced Dirichlet


def paper_split(seed):
    return balanced_dirichlet_partition(TRAIN, TEST, 100, 0.3, n_train=500, n_test=100,
                                        rng=rng(seed))


def test_balanced_dirichlet_exact_sizes_and_full_cover_at_paper_values():
    # Paper values use every sample of both splits exactly once.
    tr, te = paper_split(0)
    assert len(tr) == len(te) == 100
    assert all(len(p) == 500 for p in tr) and all(len(p) == 100 for p in te)
    assert (use_count(tr, len(TRAIN)) == 1).all()
    assert (use_count(te, len(TEST)) == 1).all()
    assert all((np.diff(p) > 0).all() for p in tr + te)


def test_balanced_dirichlet_undersubscribed_disjoint():
    tr, te = balanced_dirichlet_partition(TRAIN, TEST, 30, 0.3, n_train=700, n_test=50,
                                          rng=rng(4))
    assert [len(p) for p in tr] == [700] * 30 and [len(p) for p in te] == [50] * 30
    assert use_count(tr, len(TRAIN)).max() == 1 and use_count(te, len(TEST)).max() == 1
    assert np.concatenate(tr).max() < len(TRAIN) and np.concatenate(te).max() < len(TEST)


def test_balanced_dirichlet_seeded():
    tr, te = paper_split(0)
    tr2, te2 = paper_split(0)
    assert same(tr, tr2) and same(te, te2)
    tr3, te3 = paper_split(1)
    assert not same(tr, tr3) and not same(te, te3)


def test_balanced_dirichlet_counts_follow_the_drawn_mixes():
    """Undersubscribed (20 × 500 of 50,000), so no class runs out and the documented law
    is exact: the first rng draw is the [clients, classes] Dirichlet matrix P, and a
    client's count of class c is Binomial(n, P[k, c]) in both splits. We re-derive P from
    the seed and test (a) every cell within 5σ + 1 of n·P and (b) over 10 seeds, the
    standardised residuals of well-populated cells have mean ≈ 0 and mean square ≈ 1
    (≈ 4σ bands: fixed seeds, so not flaky; a mix ignored, shared across clients or
    rounded deterministically fails)."""
    z = {500: [], 100: []}
    for seed in range(10):
        tr, te = balanced_dirichlet_partition(TRAIN, TEST, 20, 0.3, n_train=500, n_test=100,
                                              rng=rng(seed))
        P = rng(seed).dirichlet(np.full(C, 0.3), size=20)
        for parts, labels, n in ((tr, TRAIN, 500), (te, TEST, 100)):
            N = counts(labels, parts)
            sd = np.sqrt(n * P * (1 - P))
            assert (np.abs(N - n * P) <= 5 * sd + 1).all()
            well = sd ** 2 >= 5   # chosen from P only, so no selection bias on N
            z[n].append(((N - n * P) / np.where(well, sd, 1))[well])
    for n, zs in z.items():
        zs = np.concatenate(zs)
        assert len(zs) > 500
        assert abs(zs.mean()) < 0.15, (n, zs.mean())
        assert 0.8 < (zs ** 2).mean() < 1.2, (n, (zs ** 2).mean())


def test_balanced_dirichlet_full_subscription_bends_mixes_little_and_evenly():
    """At the paper's values demand exceeds some classes; the trimming spreads the change
    over all clients (a first-come greedy fill would leave the last clients far off)."""
    tr, _ = paper_split(0)
    P = rng(0).dirichlet(np.full(C, 0.3), size=100)
    d = tv(counts(TRAIN, tr) / 500, P)
    assert d.mean() < 0.15 and d.max() < 0.4
    assert d[:50].mean() < 2 * d[50:].mean() and d[50:].mean() < 2 * d[:50].mean()


def test_balanced_dirichlet_test_mix_follows_train_mix():
    tr, te = paper_split(2)
    htr, hte = counts(TRAIN, tr) / 500, counts(TEST, te) / 100
    own = tv(htr, hte).mean()
    other = tv(np.roll(htr, 1, axis=0), hte).mean()  # someone else's train mix
    assert own < 0.15 and other > 0.4, (own, other)


def test_balanced_dirichlet_class_missing_from_a_split():
    test = TEST[TEST != 9]  # class 9 only in train: test counts route around it
    tr, te = balanced_dirichlet_partition(TRAIN, test, 20, 0.3, n_train=200, n_test=100,
                                          rng=rng(0))
    assert all(len(p) == 100 for p in te) and use_count(te, len(test)).max() == 1
    assert all(len(p) == 200 for p in tr)


def test_balanced_dirichlet_errors():
    with pytest.raises(ValueError, match=r"num_clients=101 × n_train=500 = 50500 exceeds "
                                         r"the 50000 samples of the train split"):
        balanced_dirichlet_partition(TRAIN, TEST, 101, 0.3, n_train=500, n_test=10, rng=rng(0))
    with pytest.raises(ValueError, match=r"num_clients=100 × n_test=101 = 10100 exceeds "
                                         r"the 10000 samples of the test split"):
        balanced_dirichlet_partition(TRAIN, TEST, 100, 0.3, n_train=500, n_test=101, rng=rng(0))
    with pytest.raises(ValueError, match="alpha must be > 0, got 0"):
        balanced_dirichlet_partition(TRAIN, TEST, 10, 0, n_train=5, n_test=1, rng=rng(0))


# --------------------------------------------------------------------------- summary


def test_partition_summary_matches_bincount_and_is_jsonable():
    labels = TRAIN[:3000]
    parts = shard_partition(labels, 12, 2, rng=rng(0))
    s = partition_summary(labels, parts, C)
    json.dumps(s)
    expect = np.stack([np.bincount(labels[p], minlength=C) for p in parts])
    np.testing.assert_array_equal(np.array(s["histogram"]), expect)
    assert s["sizes"] == [len(p) for p in parts]
    assert s["class_totals"] == expect.sum(0).tolist()
    assert s["classes_held"] == (expect > 0).sum(1).tolist()
    assert s["total_assigned"] == s["unique_assigned"] == 3000
    text = format_partition_summary(s, max_clients=3)
    assert "total" in text and "9 more clients" in text
    assert " ".join(str(v) for v in expect[0]) in " ".join(text.split("\n")[2].split())


def test_plot_partition_writes_png(tmp_path):
    tr, _ = paper_split(0)
    path = plot_partition(partition_summary(TRAIN, tr, C), str(tmp_path / "parts.png"))
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_federate_uses_the_configured_partition():
    from fiarse_jax.data import federate, load_digits
    from fiarse_jax.data.summary import federated_summary
    ds = load_digits()
    common = dict(num_clients=20, alpha=0.5, test_fraction=0.2, min_client_size=10, seed=0)
    iid = federate(ds, partition="iid", **common)
    total = iid.train_sizes + iid.test_sizes
    assert total.sum() == len(ds.y) and total.max() - total.min() <= 1
    shards = federated_summary(federate(ds, partition="shards", classes_per_client=2, **common))
    # a shard may straddle a class boundary (1,797 samples in 40 shards), so ≤ 2 classes
    # per shard, and most of a client's samples are in its two largest classes
    assert max(shards["classes_held"]) <= 4
    top2 = [sum(sorted(h)[-2:]) / sum(h) for h in shards["histogram"]]
    assert np.mean(top2) > 0.8
    # a client's test split is carved from its own shards: no new classes
    for train_h, test_h in zip(shards["histogram"], shards["test"]["histogram"]):
        assert sum(1 for h, t in zip(train_h, test_h) if h + t > 0) <= 4
    with pytest.raises(ValueError, match="needs a dataset with a separate test split"):
        federate(ds, partition="balanced_dirichlet", **common)
