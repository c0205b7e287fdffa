"""server.aggregate: the holder average against a coordinate-by-coordinate NumPy loop."""
import chex
import jax
import numpy as np
import pytest

from fiarse_jax.core import server


def np_aggregate(params, deltas, masks, lr):
    out = params.astype(np.float64).copy()
    flat_p = out.reshape(-1)
    d = deltas.reshape(deltas.shape[0], -1)
    m = masks.reshape(masks.shape[0], -1)
    for j in range(flat_p.size):
        holders = [i for i in range(d.shape[0]) if m[i, j] == 1]
        if holders:
            flat_p[j] -= lr * np.mean([d[i, j] for i in holders])
    return out


@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_holder_average_with_overlapping_masks(server_lr):
    rng = np.random.default_rng(0)
    clients = 6
    params = {"a": {"kernel": rng.normal(size=(4, 5)).astype(np.float32)},
              "b": rng.normal(size=(7,)).astype(np.float32)}
    masks = jax.tree_util.tree_map(
        lambda p: (rng.random((clients,) + p.shape) < 0.4).astype(np.float32), params)
    masks["b"][:, 0] = 0.0  # a coordinate nobody holds stays unchanged
    deltas = jax.tree_util.tree_map(
        lambda p, m: rng.normal(size=(clients,) + p.shape).astype(np.float32) * m, params, masks)
    new = server.aggregate(params, deltas, masks, server_lr=server_lr)
    for path in (("a", "kernel"), ("b",)):
        get = lambda t: t[path[0]][path[1]] if len(path) == 2 else t[path[0]]  # noqa: E731
        np.testing.assert_allclose(np.asarray(get(new)),
                                   np_aggregate(get(params), get(deltas), get(masks), server_lr),
                                   rtol=1e-5, atol=1e-6)
    assert float(new["b"][0]) == float(params["b"][0])


def test_holders_counted_by_mask_not_by_nonzero_delta():
    params = {"w": np.zeros(3, np.float32)}
    deltas = {"w": np.array([[1.0, 2.0, 0.0], [0.0, 4.0, 0.0]], np.float32)}
    masks = {"w": np.array([[1, 1, 0], [1, 1, 0]], np.float32)}
    new = server.aggregate(params, deltas, masks)
    # coordinate 0: client 1 holds it with delta 0 → mean(1, 0) = 0.5; w = 0 − 0.5.
    np.testing.assert_allclose(np.asarray(new["w"]), [-0.5, -3.0, 0.0])


def test_sign_convention_old_minus_new():
    params = {"w": np.array([1.0, 2.0], np.float32)}
    new_local = np.array([0.5, 2.5], np.float32)
    deltas = {"w": (params["w"] - new_local)[None]}
    out = server.aggregate(params, deltas, {"w": np.ones((1, 2), np.float32)})
    chex.assert_trees_all_close(out, {"w": new_local})


def test_holder_average_returns_counts():
    masks = {"w": np.array([[1, 0], [1, 1], [0, 0]], np.float32)}
    avg, counts = server.holder_average({"w": np.ones((3, 2), np.float32)}, masks)
    np.testing.assert_array_equal(np.asarray(counts["w"]), [2, 1])
    np.testing.assert_array_equal(np.asarray(avg["w"]), [1, 1])


def test_nan_outside_a_mask_is_ignored_not_multiplied():
    """NaN·0 = NaN: a product with the mask would carry a client's unheld NaN into the sum
    (and the count-weighted mean) of every coordinate. Selecting by the mask drops it."""
    rng = np.random.default_rng(1)
    params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": np.zeros(5, np.float32)}
    masks = {"w": (rng.random((4, 3, 4)) < 0.5).astype(np.float32),
             "b": np.ones((4, 5), np.float32)}
    masks["b"][2, :2] = 0.0
    clean = jax.tree_util.tree_map(
        lambda m: np.where(m > 0, rng.normal(size=m.shape), 0.0).astype(np.float32), masks)
    dirty = {k: np.where(masks[k] > 0, clean[k], np.nan).astype(np.float32) for k in clean}
    dirty["w"][0, masks["w"][0] == 0] = np.inf     # ±Inf as well
    assert np.isnan(dirty["b"][2]).any() and np.isnan(dirty["w"]).any()
    got, want = server.aggregate(params, dirty, masks), server.aggregate(params, clean, masks)
    for k in params:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
        np.testing.assert_allclose(np.asarray(got[k]),
                                   np_aggregate(params[k], clean[k], masks[k], 1.0),
                                   rtol=1e-5, atol=1e-6)
    totals, counts = server.holder_sums(dirty, masks)
    for k in params:
        np.testing.assert_allclose(np.asarray(totals[k]), (clean[k] * masks[k]).sum(0),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(counts[k]), masks[k].sum(0))
