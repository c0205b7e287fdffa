"""aggregators: every rule against a coordinate-by-coordinate NumPy loop, on a small
pytree whose masks include coordinates held by 0, 1, 2 and all clients."""
import math

import chex
import jax
import numpy as np
import pytest

from fiarse_jax.robust import aggregators
from fiarse_jax.robust.aggregators import aggregate_deltas

N = 7
SHAPES = {"conv": {"kernel": (3, 2, 2)}, "dense": (4, 5), "norm": (6,)}


def make_updates(seed=0):
    """Random deltas (NaN outside the masks: must be ignored) and overlapping masks."""
    rng = np.random.default_rng(seed)
    masks = jax.tree_util.tree_map(lambda s: (rng.random((N,) + s) < 0.6).astype(np.float32),
                                   SHAPES, is_leaf=lambda s: isinstance(s, tuple))
    dense = masks["dense"].reshape(N, -1)
    dense[:, :3] = 0             # coordinate 0: held by nobody
    dense[3, 1] = 1              # coordinate 1: one holder
    dense[[1, 5], 2] = 1         # coordinate 2: two holders
    dense[:, 3] = 1              # coordinate 3: everybody
    masks["norm"][:] = 1         # normalisation params: held by all
    deltas = jax.tree_util.tree_map(
        lambda m: np.where(m > 0, rng.normal(size=m.shape), np.nan).astype(np.float32), masks)
    return deltas, masks


def np_per_coordinate(deltas, masks, rule):
    """Apply ``rule(holder values) -> float`` coordinate by coordinate; 0 without holders."""
    def leaf(d, m):
        flat_d, flat_m = d.reshape(d.shape[0], -1), m.reshape(m.shape[0], -1)
        out = np.zeros(flat_d.shape[1])
        for j in range(flat_d.shape[1]):
            vals = [flat_d[i, j] for i in range(flat_d.shape[0]) if flat_m[i, j] > 0]
            out[j] = rule(np.array(vals, np.float64)) if vals else 0.0
        return out.reshape(d.shape[1:])
    return jax.tree_util.tree_map(leaf, deltas, masks)


def np_trimmed(vals, beta):
    k = math.floor(beta * len(vals))
    return np.sort(vals)[k:len(vals) - k].mean()


def np_counts(masks):
    return jax.tree_util.tree_map(lambda m: (m > 0).sum(axis=0).astype(np.float32), masks)


def _n(tree):
    return jax.tree_util.tree_leaves(tree)[0].shape[0]


def _per_client(vector, x):
    return vector.reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def np_client_norms(deltas, masks):
    leaves = list(zip(jax.tree_util.tree_leaves(deltas), jax.tree_util.tree_leaves(masks)))
    return np.array([math.sqrt(sum(float(np.sum(np.where(m[i] > 0, d[i], 0.0) ** 2))
                                   for d, m in leaves)) for i in range(_n(deltas))])


def np_krum_select(deltas, masks, f, m):
    n = _n(deltas)
    flat_d = np.concatenate([x.reshape(n, -1) for x in jax.tree_util.tree_leaves(deltas)], 1)
    flat_m = np.concatenate([x.reshape(n, -1) for x in jax.tree_util.tree_leaves(masks)], 1)
    dist = np.full((n, n), np.inf)
    for i in range(n):
        for j in range(n):
            shared = [c for c in range(flat_d.shape[1]) if flat_m[i, c] and flat_m[j, c]]
            if i != j and shared:
                dist[i, j] = np.mean([(flat_d[i, c] - flat_d[j, c]) ** 2 for c in shared])
    scores = [np.sort(dist[i])[:n - f - 2].sum() for i in range(n)]
    return np.isin(np.arange(n), np.argsort(scores, kind="stable")[:m])


def np_holder_mean(deltas, masks, keep):
    masks = jax.tree_util.tree_map(lambda x: x * _per_client(keep, x), masks)
    return np_per_coordinate(deltas, masks, np.mean), np_counts(masks)


def reference(name, deltas, masks, options):
    if name == "mean":
        return np_per_coordinate(deltas, masks, np.mean), np_counts(masks)
    if name == "median":
        return np_per_coordinate(deltas, masks, np.median), np_counts(masks)
    if name == "trimmed_mean":
        return (np_per_coordinate(deltas, masks, lambda v: np_trimmed(v, options["beta"])),
                np_counts(masks))
    if name == "norm_bounded":
        norms = np_client_norms(deltas, masks)
        scale = np.array([min(1.0, options["max_norm"] / v) if v > 0 else 1.0 for v in norms])
        scaled = jax.tree_util.tree_map(lambda d: d * _per_client(scale, d), deltas)
        return np_per_coordinate(scaled, masks, np.mean), np_counts(masks)
    keep = np_krum_select(deltas, masks, options["num_byzantine"], options["num_selected"])
    return np_holder_mean(deltas, masks, keep.astype(np.float32))


CASES = [("mean", {}), ("median", {}), ("trimmed_mean", {"beta": 0.2}),
         ("trimmed_mean", {"beta": 0.49}), ("norm_bounded", {"max_norm": 5.0}),
         ("multi_krum", {"num_byzantine": 1, "num_selected": 3})]


@pytest.mark.parametrize("name,options", CASES)
@pytest.mark.parametrize("jit", [False, True])
def test_rule_matches_numpy_loop(name, options, jit):
    deltas, masks = make_updates()
    fn = lambda d, m: aggregate_deltas(name, d, m, **options)  # noqa: E731
    agg, counts = (jax.jit(fn) if jit else fn)(deltas, masks)
    want_agg, want_counts = reference(name, deltas, masks, options)
    chex.assert_trees_all_close(agg, want_agg, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(counts, want_counts)
    assert np.asarray(agg["dense"]).reshape(-1)[0] == 0.0  # held by nobody


def test_norm_bounded_clips_some_not_all():
    deltas, masks = make_updates()
    norms = np_client_norms(deltas, masks)
    assert (norms > 5.0).any() and (norms < 5.0).any()  # the case in CASES exercises both


def test_trimmed_mean_few_holders_and_extremes():  # β = 0.49 (never empty) is in CASES
    d = {"w": np.array([[1.0, 5.0, 1.0], [2.0, 7.0, 2.0], [9.0, 0.0, 100.0],
                        [3.0, 0.0, -50.0], [4.0, 0.0, 3.0]], np.float32)}
    m = {"w": np.array([[1, 1, 1], [1, 1, 1], [1, 0, 1], [1, 0, 1], [1, 0, 1]], np.float32)}
    agg, _ = aggregate_deltas("trimmed_mean", d, m, beta=0.2)
    # 5 holders: drop 1 each side; 2 holders: ⌊0.4⌋ = 0, keep both.
    np.testing.assert_allclose(agg["w"], [3.0, 6.0, 2.0])


def test_median_even_count_and_single_holder():
    d = {"w": np.array([[1.0, 4.0], [3.0, 0.0], [10.0, 0.0], [-2.0, 0.0]], np.float32)}
    m = {"w": np.array([[1, 1], [1, 0], [1, 0], [1, 0]], np.float32)}
    agg, counts = aggregate_deltas("median", d, m)
    np.testing.assert_allclose(agg["w"], [2.0, 4.0])
    np.testing.assert_allclose(counts["w"], [4.0, 1.0])


@pytest.mark.parametrize("name,options", CASES)
def test_client_weights_make_rejected_clients_non_holders(name, options):
    deltas, masks = make_updates(seed=1)
    weights = np.array([1, 0, 1, 1, 1, 1, 1], np.float32)  # client 1 rejected
    deltas["dense"][1] = np.inf  # whatever a rejected client sends is ignored
    agg, counts = aggregate_deltas(name, deltas, masks, client_weights=weights, **options)
    if name == "multi_krum":  # as if client 1 had not taken part (k = p − f − 2)
        drop = lambda t: jax.tree_util.tree_map(lambda x: np.delete(x, 1, axis=0), t)  # noqa: E731
        keep = np.insert(np_krum_select(drop(deltas), drop(masks), options["num_byzantine"],
                                        options["num_selected"]), 1, False)
        want = np_holder_mean(deltas, masks, keep.astype(np.float32))
    else:
        want = reference(name, deltas, jax.tree_util.tree_map(
            lambda x: x * _per_client(weights, x), masks), options)
        assert np.asarray(counts["dense"]).reshape(-1)[2] == 1  # held by 1 (rejected) and 5
    chex.assert_trees_all_close((agg, counts), want, rtol=1e-5, atol=1e-6)

    # Nobody accepted: aggregate 0 everywhere, the model stays unchanged.
    none, none_counts = aggregate_deltas(name, deltas, masks, client_weights=np.zeros(N), **options)
    zeros = jax.tree_util.tree_map(lambda x: np.zeros(x.shape[1:], np.float32), masks)
    chex.assert_trees_all_equal((none, none_counts), (zeros, zeros))


def test_krum_picks_the_honest_clients():
    rng = np.random.default_rng(3)
    n = 8
    base = {"a": rng.normal(size=(5, 4)), "b": rng.normal(size=(6,))}
    masks = {"a": (rng.random((n, 5, 4)) < 0.7).astype(np.float32),
             "b": np.ones((n, 6), np.float32)}
    deltas = jax.tree_util.tree_map(
        lambda b: (b + 0.1 * rng.normal(size=(n,) + b.shape)).astype(np.float32), base)
    for leaf in deltas.values():
        leaf[[2, 6]] += 100.0  # two far outliers
    agg, counts = aggregate_deltas("multi_krum", deltas, masks, num_byzantine=2)  # m = n − f
    np.testing.assert_array_equal(counts["b"], 6.0)  # six clients selected
    honest = np.array([1, 1, 0, 1, 1, 1, 0, 1], np.float32)
    chex.assert_trees_all_close((agg, counts), aggregate_deltas("mean", deltas, masks,
                                                                client_weights=honest), rtol=1e-6)


def test_krum_distance_is_per_shared_coordinate():
    """Clients 0-2 hold half the model, 3-5 all of it, attacker 6 a single coordinate.
    Summed squared distances would rank the attacker best (it shares one coordinate
    with everyone); the mean over shared coordinates ranks it worst."""
    rng = np.random.default_rng(4)
    deltas = {"w": (1.0 + 0.3 * rng.normal(size=(7, 40))).astype(np.float32)}
    masks = {"w": np.ones((7, 40), np.float32)}
    masks["w"][:3, 20:] = 0
    masks["w"][6, 1:] = 0
    deltas["w"][6, 0] += 1.5
    h, x = masks["w"] > 0, deltas["w"]
    raw = np.array([[np.sum(((x[i] - x[j]) ** 2)[h[i] & h[j]]) if i != j else np.inf
                     for j in range(7)] for i in range(7)])  # every pair shares coordinate 0
    assert np.argmin(np.sort(raw, axis=1)[:, :4].sum(axis=1)) == 6
    keep = aggregators.krum_select(deltas, masks, num_byzantine=1, num_selected=6)
    np.testing.assert_array_equal(keep, [True] * 6 + [False])


@pytest.mark.parametrize("name,options,message", [
    ("trimmed_mean", {"beta": 0.6}, r"trimmed_mean: beta = 0.6 must be in \[0, 0.5\)"),
    ("trimmed_mean", {"beta": -0.1}, r"beta = -0.1"),
    ("norm_bounded", {"max_norm": 0.0}, r"norm_bounded: max_norm = 0.0 must be"),
    ("norm_bounded", {}, r"^server.norm_bounded.max_norm is missing \(a required option of "
                         r"server.norm_bounded\)$"),
    ("median", {"beta": 0.1}, r"^server.median.beta = 0.1: is not an option of server.median; "
                              r"options: \[\]$"),
    ("trimmed_mean", {"beta": "0.1"}, r"^server.trimmed_mean.beta = '0.1': must be a number$"),
    ("multi_krum", {"num_byzantine": 3},
     r"num_byzantine = 3 needs more than 2·3 \+ 2 clients; got 7"),
    ("multi_krum", {"num_byzantine": -1}, r"num_byzantine = -1 must be an int"),
    ("multi_krum", {"num_byzantine": 1, "num_selected": 7},
     r"num_selected = 7 must be an int in \[1, 6\]"),
    ("krum", {}, r"aggregator = 'krum' is unknown"),
])
def test_bad_options_are_clear_errors(name, options, message):
    deltas, masks = make_updates()
    with pytest.raises(ValueError, match=message):
        aggregate_deltas(name, deltas, masks, **options)


def test_client_weights_shape_is_checked():
    deltas, masks = make_updates()
    with pytest.raises(ValueError, match=r"client_weights has shape \(3,\); expected \(7,\)"):
        aggregate_deltas("mean", deltas, masks, client_weights=np.ones(3))


def test_krum_counts_only_participants_when_clients_were_refused():
    """10 clients, f = 2: two honest updates refused before the rule, two attackers send
    50.0. m = (10 − 2 refused) − f = 6 keeps the six honest ones; counting the refused
    (m = 8) would keep both attackers too (aggregate ≈ 12.5)."""
    rng = np.random.default_rng(7)
    deltas = {"w": (0.01 * rng.normal(size=(10, 12))).astype(np.float32)}
    deltas["w"][[8, 9]] = 50.0
    masks = {"w": np.ones((10, 12), np.float32)}
    weights = np.ones(10, np.float32)
    weights[[0, 1]] = 0.0                  # refused: non-finite, a screen or reputation
    agg, counts = aggregate_deltas("multi_krum", deltas, masks, client_weights=weights,
                                   num_byzantine=2)
    np.testing.assert_array_equal(counts["w"], 6.0)
    np.testing.assert_allclose(agg["w"], deltas["w"][2:8].mean(0), rtol=1e-5, atol=1e-7)
    assert np.abs(agg["w"]).max() < 0.1
    # A given m is capped at the participants − f too; with p ≤ f nobody is kept.
    _, counts = aggregate_deltas("multi_krum", deltas, masks, client_weights=weights,
                                 num_byzantine=2, num_selected=8)
    np.testing.assert_array_equal(counts["w"], 6.0)
    few = np.zeros(10, np.float32)
    few[[8, 9]] = 1.0
    agg, counts = aggregate_deltas("multi_krum", deltas, masks, client_weights=few,
                                   num_byzantine=2)
    np.testing.assert_array_equal(counts["w"], 0.0)
    np.testing.assert_array_equal(agg["w"], 0.0)
