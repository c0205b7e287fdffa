"""models.conv: the canonical-VJP and patches convolutions against lax.conv and JAX's own
gradient of it."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fiarse_jax.models import check_model_config
from fiarse_jax.models import conv as conv_lib
from fiarse_jax.models.cnn import CNN
from fiarse_jax.models.resnet import ResNet18

DN = ("NHWC", "HWIO", "NHWC")

#: (input size, C_in, C_out, kernel, stride): every distinct conv of CIFAR ResNet-18 at
#: 32×32 (stem, stage convs, stride-2 3×3 and 1×1 projections), plus odd sizes.
SHAPES = [(32, 3, 64, 3, 1), (32, 64, 64, 3, 1), (32, 64, 128, 3, 2), (32, 64, 128, 1, 2),
          (16, 128, 128, 3, 1), (16, 128, 256, 3, 2), (16, 128, 256, 1, 2),
          (8, 256, 256, 3, 1), (8, 256, 512, 3, 2), (8, 256, 512, 1, 2), (4, 512, 512, 3, 1),
          (5, 6, 7, 3, 2), (7, 4, 5, 1, 2), (9, 3, 4, 3, 1)]


def _loss(fn):
    return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))


IMPLS = {"canonical": conv_lib.canonical_conv, "patches": conv_lib.patches_conv}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("n,cin,cout,k,s", SHAPES)
def test_outputs_and_gradients_equal_lax(n, cin, cout, k, s, impl):
    rng = np.random.default_rng(n * 1000 + cin + cout + k + s)
    x = jnp.asarray(rng.normal(size=(3, n, n, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
    pad = ((k - 1) // 2,) * 2
    def ref(x, w):
        return lax.conv_general_dilated(x, w, (s, s), (pad, pad), dimension_numbers=DN)

    def ours(x, w):
        return IMPLS[impl](x, w, (s, s), (pad, pad))

    y_ours, y_ref = jax.jit(ours)(x, w), jax.jit(ref)(x, w)
    if impl == "canonical":   # the same forward convolution
        np.testing.assert_array_equal(y_ours, y_ref)
    else:   # the same products, summed in another order
        assert y_ours.shape == y_ref.shape and y_ours.dtype == y_ref.dtype
        np.testing.assert_allclose(y_ours, y_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(y_ref).max()))
    g_ours = jax.jit(jax.grad(_loss(ours), (0, 1)))(x, w)
    g_ref = jax.jit(jax.grad(_loss(ref), (0, 1)))(x, w)
    for a, b in zip(g_ours, g_ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 0), (0, 1))])
def test_drop_in_handles_string_and_asymmetric_padding(padding, impl):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 9, 8, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    ours = conv_lib.conv_general_dilated(impl)
    for strides in ((1, 1), (2, 1)):
        def f(fn, strides=strides):
            return lambda x, w: jnp.sum(jnp.tanh(fn(x, w, strides, padding, dimension_numbers=DN)))
        g_ours = jax.grad(f(ours), (0, 1))(x, w)
        g_ref = jax.grad(f(lax.conv_general_dilated), (0, 1))(x, w)
        for a, b in zip(g_ours, g_ref):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_other_convolutions_fall_back_to_lax(impl, monkeypatch):
    """Dilation, feature groups, a negative padding and an input smaller than the kernel
    are not the custom paths': lax computes them."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
    ours = conv_lib.conv_general_dilated(impl)
    # None of these reaches a custom path. A crop's values are not compared: XLA:CPU
    # (jaxlib 0.10.2) returns garbage (|y| ~ 1e11, varying between compilations) for
    # this convolution, lax's own call included.
    def refuse(*args):
        raise AssertionError("a custom convolution was called")
    for name in ("patches_conv", "canonical_conv"):
        monkeypatch.setattr(conv_lib, name, refuse)
    tiny = x[:, :2, :2]   # smaller than the kernel: no output
    np.testing.assert_array_equal(ours(tiny, w[:, :, :1].repeat(4, 2), (1, 1), "VALID",
                                       dimension_numbers=DN),
                                  lax.conv_general_dilated(tiny, w[:, :, :1].repeat(4, 2), (1, 1),
                                                           "VALID", dimension_numbers=DN))
    crop = ((-1, 1), (0, 0))
    assert ours(x, w[:, :, :1].repeat(4, 2), (1, 1), crop, dimension_numbers=DN).shape == \
        lax.conv_general_dilated(x, w[:, :, :1].repeat(4, 2), (1, 1), crop,
                                 dimension_numbers=DN).shape
    kw = dict(dimension_numbers=DN, rhs_dilation=(2, 2))
    np.testing.assert_array_equal(ours(x, w[:, :, :1].repeat(4, 2), (1, 1), "SAME", **kw),
                                  lax.conv_general_dilated(x, w[:, :, :1].repeat(4, 2), (1, 1),
                                                           "SAME", **kw))
    np.testing.assert_array_equal(
        ours(x, w, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=2),
        lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN,
                                 feature_group_count=2))


def _model_step(model, params, x, y):
    def loss(p):
        logits = model.apply({"params": p}, x)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])
    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("make,vmapped", [
    (lambda impl: ResNet18(num_classes=10, widths=(8, 16, 16, 32), blocks_per_stage=(1, 1, 1, 1),
                           conv=impl), False),
    (lambda impl: CNN(features=(4, 8), hidden_sizes=(16,), num_classes=10, conv=impl), True)])
def test_models_agree_across_conv_impls_and_under_vmap(make, vmapped):
    """Same params, same loss and gradients with either implementation, for one client
    and (CNN) for two clients vmapped (their weights batched: the vmap strategy's case)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 3, 8, 8, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=(2, 3)))
    params = jax.jit(make("xla").init)(jax.random.key(0), x[0])["params"]
    two = jax.tree_util.tree_map(lambda a: jnp.stack([a, 1.1 * a]), params)
    out = {}
    for impl in ("xla", *IMPLS):
        m = make(impl)
        out[impl] = (jax.jit(lambda p, m=m: _model_step(m, p, x[0], y[0]))(params),
                     jax.jit(jax.vmap(lambda p, a, b, m=m: _model_step(m, p, a, b)))(two, x, y)
                     if vmapped else ())
    for impl in IMPLS:
        for a, b in zip(jax.tree_util.tree_leaves(out[impl]), jax.tree_util.tree_leaves(out["xla"])):
            np.testing.assert_allclose(a, b, rtol=1e-4,
                                       atol=1e-5 * max(1.0, float(jnp.abs(b).max())))


def test_patches_under_vmap_are_batched_matrix_products_not_grouped_convolutions():
    """Clients' own kernels under vmap (the vmap strategy's case): JAX's gradient of
    lax.conv makes grouped convolutions of them; the patches implementation has no
    convolution left at all, forward or backward — matrix products batched over the
    client axis — and gives the same values."""
    model = {impl: CNN(features=(4, 8), hidden_sizes=(16,), num_classes=10, conv=impl)
             for impl in ("xla", "patches")}
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(3, 5, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=(3, 5)))
    params = jax.jit(model["xla"].init)(jax.random.key(0), x[0])["params"]
    three = jax.tree_util.tree_map(lambda a: jnp.stack([a, 1.1 * a, 0.9 * a]), params)
    step = {impl: jax.jit(jax.vmap(lambda p, a, b, m=m: _model_step(m, p, a, b)))
            for impl, m in model.items()}
    hlo = {impl: f.lower(three, x, y).compile().as_text() for impl, f in step.items()}
    grouped = re.findall(r"convolution\(.*?feature_group_count=(\d+)", hlo["xla"])
    assert grouped and max(int(g) for g in grouped) > 1   # what vmap makes of lax.conv
    assert " convolution(" not in hlo["patches"]
    assert re.search(r"dot\(.*lhs_batch_dims=\{0\}", hlo["patches"])
    for a, b in zip(jax.tree_util.tree_leaves(step["patches"](three, x, y)),
                    jax.tree_util.tree_leaves(step["xla"](three, x, y))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(jnp.abs(b).max())))


def test_canonical_convolutions_inside_a_loop_keep_the_forward_layout():
    """The compiled K-step program (fori_loop, as the vmap strategy runs it): with the
    canonical implementation every convolution XLA keeps — forward and both backward —
    reads NHWC × HWIO → NHWC, the layout XLA's CPU convolution library runs (JAX's own
    backward convolutions inside a loop were left to a naive loop: 30× slower)."""
    model = ResNet18(num_classes=10, widths=(8, 16, 16, 32), blocks_per_stage=(1, 1, 1, 1),
                     conv="canonical")
    x = jnp.zeros((4, 32, 32, 3), jnp.float32)   # CIFAR's size (at 2×2 maps XLA swaps operands)
    y = jnp.zeros(4, jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]

    def k_steps(p):
        def body(_, q):
            g = _model_step(model, q, x, y)[1]
            return jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, q, g)
        return jax.lax.fori_loop(0, 3, body, p)

    text = jax.jit(k_steps).lower(params).compile().as_text()
    assert "while" in text
    labels = re.findall(r" convolution\(.*?dim_labels=(\S+?),", text)
    # 12 convolutions: each forward, backward-filter and (but the stem's) backward-data
    assert len(labels) >= 12 * 3 - 1
    assert set(labels) == {"b01f_01io->b01f"}, sorted(set(labels))


def test_auto_follows_the_backend_and_bad_names_are_one_line():
    assert conv_lib.resolve("auto", "cpu") == "canonical"
    assert conv_lib.resolve("auto", "gpu") == conv_lib.resolve("auto", "tpu") == "xla"
    assert conv_lib.resolve("xla", "cpu") == "xla"
    with pytest.raises(ValueError, match="conv = 'im2col'"):
        conv_lib.conv_general_dilated("im2col")
    with pytest.raises(ValueError, match=r"^model.conv = 'fast': must be one of"):
        check_model_config({"name": "resnet18", "conv": "fast"})
    assert check_model_config({"name": "cnn", "conv": "xla"}) is CNN
