"""fiarse.submodel: forward and both gradient modes against the closed form in NumPy."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MASKABLE, make_params

from fiarse_jax.core import fiarse, masks


def np_tcb(x, theta):
    a = np.abs(x).astype(np.float64)
    d = (a + theta) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        extra = np.where(d > 0, 2 * a * theta / d, 0.0)
    return 1.0 + extra


def coefficients(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda l: rng.normal(size=l.shape).astype(np.float32), params)


def nonlinear_loss(sub, coef):
    """Σ sin(sub)·c: its gradient w.r.t. sub is cos(sub)·c, so we know g exactly."""
    terms = jax.tree_util.tree_map(lambda s, c: jnp.sum(jnp.sin(s) * c), sub, coef)
    return sum(jax.tree_util.tree_leaves(terms))


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25, 1 / 16])
def test_forward_is_x_times_mask(params, ratio):
    theta = masks.importance_threshold(params, ratio)
    sub = fiarse.submodel(params, theta)
    for a, b in MASKABLE:
        x = params[a][b]
        np.testing.assert_array_equal(np.asarray(sub[a][b]), x * (np.abs(x) >= float(theta)))
    chex.assert_trees_all_equal(sub["BatchNorm_0"], params["BatchNorm_0"])


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("gradient", ["tcb", "masked"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_gradient_matches_closed_form(params, gradient, scope, use_jit):
    theta = masks.importance_threshold(params, 0.3, scope=scope)
    coef = coefficients(params)

    def loss(p):
        return nonlinear_loss(fiarse.submodel(p, theta, gradient=gradient), coef)

    grad_fn = jax.jit(jax.grad(loss)) if use_jit else jax.grad(loss)
    grads = grad_fn(params)
    for a, b in MASKABLE:
        x = params[a][b].astype(np.float64)
        th = float(theta) if scope == "global" else float(theta[a][b])
        m = (np.abs(x) >= th).astype(np.float64)
        g = np.cos(x * m) * coef[a][b]          # dL/d(sub) at sub = x ⊙ M
        expected = g * m * (np_tcb(x, th) if gradient == "tcb" else 1.0)
        np.testing.assert_allclose(np.asarray(grads[a][b]), expected, rtol=2e-5, atol=1e-6)
    for leaf in ("scale", "bias"):  # not masked: the plain gradient
        x = params["BatchNorm_0"][leaf]
        np.testing.assert_allclose(np.asarray(grads["BatchNorm_0"][leaf]),
                                   np.cos(x) * coef["BatchNorm_0"][leaf], rtol=2e-5, atol=1e-6)


def test_tcb_bias_is_strictly_positive_on_kept_and_zero_on_dropped(params):
    theta = masks.importance_threshold(params, 0.25)
    ones = jax.tree_util.tree_map(np.ones_like, params)
    grads = jax.grad(lambda p: sum(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda s, c: jnp.sum(s * c), fiarse.submodel(p, theta), ones))))(params)
    k = np.asarray(grads["Dense_0"]["kernel"])
    kept = np.abs(params["Dense_0"]["kernel"]) >= float(theta)
    assert np.all(k[kept] > 1.0) and np.all(k[kept] <= 1.5 + 1e-6)  # 2aθ/(a+θ)² ≤ 1/2
    assert np.all(k[~kept] == 0.0)


@pytest.mark.parametrize("use_jit", [False, True])
def test_theta_zero_with_zero_weights_has_no_nan(use_jit):
    """θ = 0 (ratio 1) and zero biases: the 0/0 factor is defined as 1, never NaN."""
    params = {"Dense_0": {"kernel": jnp.array([[0.5, -0.2]]), "bias": jnp.zeros(2)}}
    theta = masks.importance_threshold(params, 1.0)
    assert float(theta) == 0.0

    def loss(p):
        sub = fiarse.submodel(p, theta, gradient="tcb")
        return jnp.sum(sub["Dense_0"]["kernel"] * 3.0) + jnp.sum(sub["Dense_0"]["bias"] * 2.0)

    f = jax.jit(jax.grad(loss)) if use_jit else jax.grad(loss)
    g = f(params)
    np.testing.assert_array_equal(np.asarray(g["Dense_0"]["kernel"]), [[3.0, 3.0]])
    np.testing.assert_array_equal(np.asarray(g["Dense_0"]["bias"]), [2.0, 2.0])


def test_tcb_factor_helper_matches_numpy():
    x = np.array([0.0, 0.1, -0.3, 1.0, 5.0], np.float32)
    for th in (0.0, 0.3, 2.0):
        np.testing.assert_allclose(np.asarray(fiarse.tcb_factor(jnp.asarray(x), th)),
                                   np_tcb(x, th), rtol=1e-6)


def test_bad_gradient_mode_and_threshold_tree(params):
    with pytest.raises(ValueError, match="'straight_through'"):
        fiarse.submodel(params, 0.1, gradient="straight_through")
    with pytest.raises(ValueError, match="thresholds have 1 leaves"):
        fiarse.submodel(params, {"a": jnp.zeros(())})


def test_float64_free_and_dtype_preserved():
    p = make_params()
    sub = fiarse.submodel(p, masks.importance_threshold(p, 0.5))
    assert all(l.dtype == np.float32 for l in jax.tree_util.tree_leaves(sub))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_tcb_equals_autodiff_of_the_float_mask_surrogate(params, scope):
    """Independent route to Eq. 3: let autodiff run the chain rule through x·M(|x|), where
    M's value is the hard mask but its derivative is 2θ/(|x|+θ)² on the kept set (the
    authors' backward). s(a) = −2θ/(a+θ) has s'(a) = 2θ/(a+θ)²."""
    theta = masks.importance_threshold(params, 0.3, scope=scope)
    coef = coefficients(params, seed=4)
    th_leaves = masks.broadcast_thresholds(params, theta)
    flags = masks.maskable_flags(params)

    def surrogate(p):
        leaves, treedef = jax.tree_util.tree_flatten(p)
        out = []
        for x, th, f in zip(leaves, th_leaves, flags):
            if not f:
                out.append(x)
                continue
            a = jnp.abs(x)
            hard = (a >= th).astype(x.dtype)
            s = -2.0 * th / (a + th)
            m = hard + hard * (s - jax.lax.stop_gradient(s))   # value: hard; slope: hard·s'
            out.append(x * m)
        return jax.tree_util.tree_unflatten(treedef, out)

    g_ref = jax.grad(lambda p: nonlinear_loss(surrogate(p), coef))(params)
    g = jax.grad(lambda p: nonlinear_loss(fiarse.submodel(p, theta, gradient="tcb"), coef))(params)
    chex.assert_trees_all_close(g, g_ref, rtol=1e-5, atol=1e-6)
