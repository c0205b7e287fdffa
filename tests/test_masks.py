"""masks: thresholds and masks against a NumPy re-derivation."""
import functools
import math
from fractions import Fraction

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MASKABLE, make_params

from fiarse_jax.core import masks

RATIOS = (1.0, 0.64, 0.5, 0.37, 0.25, 0.1, 1 / 16, 1 / 64)
#: The same ratios as exact fractions, for a reference ⌈r·N⌉ free of float noise.
EXACT = {1.0: Fraction(1), 0.64: Fraction(16, 25), 0.5: Fraction(1, 2), 0.37: Fraction(37, 100),
         0.25: Fraction(1, 4), 0.1: Fraction(1, 10), 1 / 16: Fraction(1, 16), 1 / 64: Fraction(1, 64)}


def np_maskable_abs(params):
    return np.concatenate([np.abs(params[a][b]).ravel() for a, b in MASKABLE])


def np_threshold(values, ratio):
    if ratio == 1.0:
        return 0.0
    k = math.ceil(EXACT.get(ratio, Fraction(ratio)) * values.size)
    return np.sort(values)[::-1][k - 1]


@pytest.mark.parametrize("ratio", RATIOS)
def test_global_threshold_matches_numpy_and_keeps_ceil_count(params, ratio):
    vals = np_maskable_abs(params)
    theta = masks.importance_threshold(params, ratio)
    assert theta.shape == ()
    np.testing.assert_allclose(float(theta), np_threshold(vals, ratio))
    # Distinct magnitudes: exactly ⌈r·N⌉ kept (ratio 1: everything).
    expected = math.ceil(EXACT[ratio] * vals.size)
    assert int((vals >= float(theta)).sum()) == expected


@pytest.mark.parametrize("ratio", RATIOS)
def test_global_mask_matches_numpy_and_spares_norm(params, ratio):
    m = masks.importance_mask(params, ratio)
    theta = np_threshold(np_maskable_abs(params), ratio)
    for a, b in MASKABLE:
        np.testing.assert_array_equal(np.asarray(m[a][b]),
                                      (np.abs(params[a][b]) >= theta).astype(np.float32))
    for leaf in ("scale", "bias"):
        np.testing.assert_array_equal(np.asarray(m["BatchNorm_0"][leaf]), 1.0)


def test_ratio_one_keeps_zeros_too():
    params = make_params()
    params["Dense_1"]["bias"] = np.zeros(5, np.float32)  # Flax's zero-initialised biases
    m = masks.importance_mask(params, 1.0)
    assert all(float(x.min()) == 1.0 for x in jax.tree_util.tree_leaves(m))


def test_ties_are_all_kept():
    params = {"Dense_0": {"kernel": np.array([[3.0, -2.0, 2.0, 2.0, 1.0, -0.5]], np.float32),
                          "bias": np.array([2.0, 0.1], np.float32)}}
    # |w| sorted: 3, 2, 2, 2, 2, 1, .5, .1 ; r = 0.25 → k = 2 → θ = 2, and all four 2s kept.
    theta = masks.importance_threshold(params, 0.25)
    assert float(theta) == 2.0
    m = masks.importance_mask(params, 0.25)
    kept = float(m["Dense_0"]["kernel"].sum() + m["Dense_0"]["bias"].sum())
    assert kept == 5.0


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1])
def test_layer_scope_counts_per_group(params, ratio):
    th = masks.importance_threshold(params, ratio, scope="layer")
    m = masks.importance_mask(params, ratio, scope="layer")
    for layer in ("Dense_0", "Dense_1"):
        vals = np.concatenate([np.abs(params[layer]["kernel"]).ravel(),
                               np.abs(params[layer]["bias"]).ravel()])
        ref = np_threshold(vals, ratio)
        assert float(th[layer]["kernel"]) == pytest.approx(ref)
        assert float(th[layer]["bias"]) == pytest.approx(ref)
        kept = float(m[layer]["kernel"].sum() + m[layer]["bias"].sum())
        assert kept == math.ceil(Fraction(ratio).limit_denominator(100) * vals.size)
    assert float(th["BatchNorm_0"]["scale"]) == 0.0


def test_layer_scope_custom_groups(params):
    # One group for everything reproduces the global threshold.
    th = masks.importance_threshold(params, 0.3, scope="layer", group_fn=lambda path: "all")
    g = masks.importance_threshold(params, 0.3)
    assert float(th["Dense_0"]["kernel"]) == float(g) == float(th["Dense_1"]["bias"])


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_all_levels_from_one_pass_match_single_calls(params, scope):
    many = masks.importance_thresholds(params, RATIOS, scope=scope)
    for i, r in enumerate(RATIOS):
        one = masks.importance_threshold(params, r, scope=scope)
        chex.assert_trees_all_close(jax.tree_util.tree_map(lambda t: t[i], many), one)
    jaxpr = str(jax.make_jaxpr(lambda p: masks.importance_thresholds(p, RATIOS, scope=scope))(params))
    assert "sort[" not in jaxpr
    loops = jaxpr.count("while[") + jaxpr.count("scan[")
    assert loops == (1 if scope == "global" else 2)  # one bisection per group, not per level


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_kth_largest_is_the_sorts_answer_exactly(dtype, n):
    """Ties, zeros, every rank from 1 to n: the bisection on bit patterns gives exactly
    what a descending sort gives, in the values' dtype."""
    rng = np.random.default_rng(n)
    v = np.abs(rng.normal(size=n)) * (rng.random(n) < 0.8)     # some exact zeros
    if n > 3:
        v[: n // 3] = v[n // 2]                                  # a run of ties
    v = jnp.asarray(v, dtype)
    ks = sorted({1, n, max(1, n // 2), max(1, n // 16), max(1, n // 3)})
    got = jax.jit(lambda v: masks.kth_largest(v, ks))(v)
    want = np.sort(np.asarray(v, np.float64))[::-1][np.array(ks) - 1]
    assert got.dtype == v.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float64), want)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_jit_compatible_with_static_ratio(params, scope):
    f = jax.jit(functools.partial(masks.importance_mask, ratio=0.25, scope=scope))
    chex.assert_trees_all_close(f(params), masks.importance_mask(params, 0.25, scope=scope))


class _Net(nn.Module):
    """Every kind of leaf the default rule must classify, under misleading names."""

    @nn.compact
    def __call__(self, tokens, x):
        e = nn.Embed(11, 4)(tokens).sum(1)
        x = nn.Conv(3, (3, 3), name="normal_conv")(x).reshape((x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=False, name="stem")(x)
        x = nn.LayerNorm(name="attn_ln")(x)
        x = nn.LayerNorm(use_scale=False, name="pre")(x)   # bias only
        x = nn.GroupNorm(num_groups=1, name="gn")(x[:, None, :])[:, 0]
        return nn.Dense(2, name="Denormalize_0")(x) + nn.Dense(2, use_bias=False)(e)


def test_default_rule_from_structure_not_names():
    variables = _Net().init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32),
                            jnp.zeros((1, 4, 4, 1)))
    flat, _ = jax.tree_util.tree_flatten_with_path(variables["params"])
    got = {masks.path_names(p): f
           for (p, _), f in zip(flat, masks.default_maskable(variables["params"]))}
    expected = {
        ("Embed_0", "embedding"): True,
        ("normal_conv", "kernel"): True, ("normal_conv", "bias"): True,
        ("Denormalize_0", "kernel"): True, ("Denormalize_0", "bias"): True,
        ("Dense_0", "kernel"): True,
        ("stem", "scale"): False, ("stem", "bias"): False,
        ("attn_ln", "scale"): False, ("attn_ln", "bias"): False,
        ("pre", "bias"): False,
        ("gn", "scale"): False, ("gn", "bias"): False,
    }
    assert got == expected


def test_custom_is_maskable(params):
    only_first = lambda path, leaf: path[0] == "Dense_0"  # noqa: E731
    m = masks.importance_mask(params, 0.1, is_maskable=only_first)
    np.testing.assert_array_equal(np.asarray(m["Dense_1"]["kernel"]), 1.0)
    vals = np.concatenate([np.abs(params["Dense_0"][k]).ravel() for k in ("kernel", "bias")])
    assert float(m["Dense_0"]["kernel"].sum() + m["Dense_0"]["bias"].sum()) == math.ceil(0.1 * vals.size)


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, float("nan")])
def test_bad_ratio_names_the_value(params, ratio):
    with pytest.raises(ValueError, match="capacity ratio must be in \\(0, 1\\], got"):
        masks.importance_threshold(params, ratio)


def test_bad_scope_and_no_maskable(params):
    with pytest.raises(ValueError, match="'neuronwise'"):
        masks.importance_threshold(params, 0.5, scope="neuronwise")
    with pytest.raises(ValueError, match="no maskable parameters"):
        masks.importance_threshold({"BatchNorm_0": {"scale": jnp.ones(3)}}, 0.5)
