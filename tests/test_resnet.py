"""CIFAR ResNet-18 with static BN: parameter count by hand, maskability, batch-statistics
BN, layer-scope groups, and channel groups whose shrunk dense model equals the masked one;
early-exit heads (scalefl) against truncated models."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import by_path, count, random_units

from fiarse_jax import models, policies
from fiarse_jax.core import masks, units
from fiarse_jax.policies.structured import leading_units

NARROW = {"widths": (4, 8, 8, 16)}
X = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))


def random_params(model, seed=0):
    """Parameters in ``model``'s shapes drawn with NumPy (a jitted Flax init compiles for
    ~10 s on 2 CPU cores under partitionable threefry): kernels and the head's bias
    U(±1/√fan_in), BN γ ~ U(0.5, 1.5) and β ~ N(0, 0.3²), so every γ/β matters."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), X[:1])["params"]

    def draw(path, s):
        names = masks.path_names(path)
        if names[-1] == "scale":
            v = rng.uniform(0.5, 1.5, s.shape)
        elif names[-1] == "bias" and names[0] != "head":
            v = rng.normal(0.0, 0.3, s.shape)
        else:
            fan_in = int(np.prod(s.shape[:-1])) if names[-1] == "kernel" else 16
            v = rng.uniform(-1, 1, s.shape) / np.sqrt(fan_in)
        return jnp.asarray(v, s.dtype)
    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def narrow():
    model = models.build_model("resnet18", 5, NARROW)
    params = random_params(model)
    return model, params, model.unit_groups(params)


@pytest.fixture(scope="module")
def full_apply(narrow):
    return jax.jit(narrow[0].apply)


def full_shapes(num_classes=10):
    model = models.build_model("resnet18", num_classes)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def test_param_count_by_hand():
    variables = full_shapes()
    assert set(variables) == {"params"}            # static BN: no batch_stats
    widths, cin = (64, 128, 256, 512), 64
    conv = 3 * 3 * 3 * 64                           # stem
    bn = 64
    for s, w in enumerate(widths):
        for b in range(2):
            conv += 3 * 3 * cin * w + 3 * 3 * w * w
            bn += 2 * w
            if s > 0 and b == 0:
                conv += cin * w                     # 1×1 projection shortcut
                bn += w
            cin = w
    head = 512 * 10 + 10
    assert count(variables) == conv + 2 * bn + head == 11_173_962
    # Maskable: every conv kernel (shortcuts included) and the head's kernel and bias.
    p = variables["params"]
    flags = masks.default_maskable(p)
    leaves = jax.tree_util.tree_leaves(p)
    assert sum(l.size for l, f in zip(leaves, flags) if f) == conv + head == 11_164_362
    for (path, _), f in zip(jax.tree_util.tree_flatten_with_path(p)[0], flags):
        names = masks.path_names(path)
        assert f == (names[-1] == "kernel" or names == ("head", "bias")), names
        assert f != (names[-2] in ("bn", "bn1", "bn2")), names


def test_init_has_only_params_and_torch_default_scales():
    model = models.build_model("resnet18", 5, {"widths": (2, 2, 2, 4), "blocks_per_stage": (1, 1, 1, 1)})
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), X[:1])
    assert set(variables) == {"params"}                     # static BN: no batch_stats
    for path, leaf in by_path(variables["params"]).items():
        leaf = np.asarray(leaf)
        if path[-1] == "scale":
            np.testing.assert_array_equal(leaf, 1.0)
        elif path[-1] == "bias" and path[0] != "head":
            np.testing.assert_array_equal(leaf, 0.0)
        else:   # PyTorch's default: U(±1/√fan_in) for conv/linear weights and linear bias
            fan_in = int(np.prod(leaf.shape[:-1])) if path[-1] == "kernel" else 4
            assert 0 < np.abs(leaf).max() <= 1 / np.sqrt(fan_in), path


def test_static_bn_uses_batch_statistics(narrow):
    model, params, _ = narrow
    logits = model.apply({"params": params}, X)          # no mutable collections needed
    assert logits.shape == (4, 5)
    _, inter = model.apply({"params": params}, X, capture_intermediates=True,
                           mutable=["intermediates"])
    z = np.asarray(inter["intermediates"]["stem"]["conv"]["__call__"][0], np.float64)
    got = np.asarray(inter["intermediates"]["stem"]["bn"]["__call__"][0])
    g, b = (np.asarray(params["stem"]["bn"][k]) for k in ("scale", "bias"))
    mean, var = z.mean((0, 1, 2)), z.var((0, 1, 2))
    np.testing.assert_allclose(got, (z - mean) / np.sqrt(var + 1e-5) * g + b, rtol=1e-4, atol=1e-4)
    # Evaluation normalises with the batch too: a sample's logits depend on its batch.
    assert not np.allclose(np.asarray(model.apply({"params": params}, X[:2]))[0],
                           np.asarray(logits)[0], atol=1e-4)


def test_layer_scope_groups_are_stem_stages_head(narrow):
    model, params, _ = narrow
    assert model.layer_names() == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
    th = by_path(masks.importance_threshold(params, 0.3, scope="layer"))
    flags = dict(zip(by_path(params), masks.default_maskable(params)))
    groups = {}
    for path, leaf in by_path(params).items():
        if flags[path]:
            groups.setdefault(path[0], []).append(np.abs(np.asarray(leaf)).ravel())
    assert sorted(groups) == sorted(model.layer_names())
    for name, mags in groups.items():
        desc = np.sort(np.concatenate(mags))[::-1]
        ref = desc[masks.keep_count(0.3, desc.size) - 1]
        for path, t in th.items():
            if path[0] == name and flags[path]:
                assert float(t) == ref, path


def test_groups_tie_each_residual_stream(narrow):
    _, params, groups = narrow
    g = {x.name: x for x in groups}
    assert [x.name for x in groups] == [
        "stream1", "stage1.block1", "stage1.block2", "stream2", "stage2.block1", "stage2.block2",
        "stream3", "stage3.block1", "stage3.block2", "stream4", "stage4.block1", "stage4.block2"]
    prod = {m.path[:-1] for m in g["stream1"].producers}
    assert prod == {("stem", "conv"), ("stem", "bn"), ("stage1", "block1", "conv2"),
                    ("stage1", "block1", "bn2"), ("stage1", "block2", "conv2"),
                    ("stage1", "block2", "bn2")}
    assert {m.path for m in g["stream1"].consumers} == {
        ("stage1", "block1", "conv1", "kernel"), ("stage1", "block2", "conv1", "kernel"),
        ("stage2", "block1", "conv1", "kernel"), ("stage2", "block1", "shortcut", "conv", "kernel")}
    assert ("stage2", "block1", "shortcut", "bn", "scale") in {m.path for m in g["stream2"].producers}
    assert ("head", "kernel") in {m.path for m in g["stream4"].consumers}
    # Every leaf but the image-input and class-output axes belongs to a group; BN γ/β are producers.
    members = {m.path for x in groups for m in x.members}
    assert members == set(by_path(params)) - {("head", "bias")}


def leading(groups, r):
    return {k: np.asarray(v[0]) for k, v in leading_units(groups, (r,)).items()}


CASES = [("random", 0), ("random", 1), ("leading", 0.25), ("leading", 1 / 16)]


@pytest.mark.parametrize("kind,arg", CASES)
def test_shrunk_dense_equals_masked_full(narrow, full_apply, kind, arg):
    """Why this is exact with static BN: a dropped channel's producers (conv output axis,
    BN γ and β) are all masked to 0, so its conv output is 0 and its BN gives
    (0 − 0)/√(0 + ε)·0 + 0 = 0; zeros add to zeros along the residual stream and
    ReLU(0) = 0; its consumers' input weights are 0 as well. A kept channel's batch
    statistics are per channel, so they do not see the dropped ones."""
    model, params, groups = narrow
    u = random_units(groups, arg) if kind == "random" else leading(groups, arg)
    m = units.expand(params, groups, u)
    # Every member axis of a group keeps exactly the group's units: a kept input channel
    # of a conv is a kept output channel of every conv (and BN) writing that stream.
    for g in groups:
        for mem in g.members:
            leaf = np.asarray(by_path(m)[mem.path])
            along = np.moveaxis(leaf, mem.axis, 0).reshape(leaf.shape[mem.axis], -1).max(1)
            np.testing.assert_array_equal(along, np.tile(u[g.name], mem.tile), err_msg=str(mem.path))
    masked = jax.tree_util.tree_map(jnp.multiply, params, m)
    small = model.with_widths(units.kept_sizes(groups, u))
    shrunk = units.shrink(params, groups, u)
    # (Masking only the kernels would give the same logits too: a dropped channel's BN
    # output β is read only through zeroed consumer weights. Masking γ/β matters for
    # what a client holds and what the server averages, i.e. for shrink.)
    want = jax.eval_shape(small.init, jax.random.PRNGKey(0), X[:1])["params"]
    assert jax.tree_util.tree_map(np.shape, shrunk) == jax.tree_util.tree_map(lambda s: s.shape, want)
    assert count(shrunk) == int(sum(float(v.sum()) for v in jax.tree_util.tree_leaves(m)))
    np.testing.assert_allclose(np.asarray(jax.jit(small.apply)({"params": shrunk}, X)),
                               np.asarray(full_apply({"params": masked}, X)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["heterofl", "fedrolex", "fed_dropout", "fiarse_neuron"])
def test_structured_policies_run_on_resnet(narrow, full_apply, method):
    model, params, groups = narrow
    pol = policies.build_policy(method, (1.0, 0.25), {"budget": "width"}, unit_groups=groups)
    state = pol.prepare(params, 3, jax.random.PRNGKey(0))
    spec = pol.client_spec(state, 1, jax.random.PRNGKey(4))
    u = {k: np.asarray(v) for k, v in spec["units"].items()}
    assert units.kept_sizes(groups, u) == {g.name: -(-g.size // 4) for g in groups} \
        or method == "fiarse_neuron"                       # ties may keep more
    small = model.with_widths(units.kept_sizes(groups, u))
    masked = jax.tree_util.tree_map(jnp.multiply, params, pol.mask(params, spec))
    shrunk = units.shrink(params, groups, u)
    np.testing.assert_allclose(np.asarray(jax.jit(small.apply)({"params": shrunk}, X)),
                               np.asarray(full_apply({"params": masked}, X)), rtol=1e-4, atol=1e-4)


def test_with_widths_and_fields(narrow):
    model, params, groups = narrow
    full = model.with_widths(units.kept_sizes(groups, {g.name: np.ones(g.size) for g in groups}))
    assert full.widths == model.widths and full.inner_widths == (4, 4, 8, 8, 8, 8, 16, 16)
    assert jax.tree_util.tree_map(np.shape, jax.eval_shape(full.init, jax.random.PRNGKey(0), X[:1])) \
        == {"params": jax.tree_util.tree_map(np.shape, params)}
    small = model.with_widths({"stream2": 3, "stage3.block2": 5})
    assert small.widths == (4, 3, 8, 16) and small.inner_widths == (4, 4, 8, 8, 8, 5, 16, 16)
    fields = {f.name for f in dataclasses.fields(models.MODELS["resnet18"])}
    assert {"widths", "blocks_per_stage", "inner_widths", "num_classes"} <= fields
    with pytest.raises(ValueError, match="inner_widths has 3 entries"):
        jax.eval_shape(model.clone(inner_widths=(1, 2, 3)).init, jax.random.PRNGKey(0), X[:1])


def test_one_sgd_step_changes_every_conv(narrow):
    model, params, _ = narrow
    y = jnp.arange(4) % 5

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p}, X), y).mean()

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(value))
    new = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)
    for path, leaf in by_path(params).items():
        if path[-1] == "kernel":
            assert not np.allclose(np.asarray(by_path(new)[path]), np.asarray(leaf)), path
    assert float(jax.jit(loss)(new)) < float(value)


# ---- early exits (scalefl) ----------------------------------------------------------------

EXITS = {"widths": (4, 8, 8, 8), "early_exits": True}


@pytest.fixture(scope="module")
def with_exits():
    model = models.build_model("resnet18", 5, EXITS)
    params = random_params(model, seed=3)
    return model, params, model.unit_groups(params)


def test_exit_heads_are_extra_top_level_dense_layers_initialised_like_head():
    opts = {"widths": (2, 2, 2, 4), "blocks_per_stage": (1, 1, 1, 1)}
    plain = models.build_model("resnet18", 5, opts)
    model = models.build_model("resnet18", 5, {**opts, "early_exits": True})
    p0 = plain.init(jax.random.PRNGKey(0), X[:1])["params"]
    params = model.init(jax.random.PRNGKey(0), X[:1])["params"]
    assert sorted(params) == sorted(list(p0) + ["exit1", "exit2", "exit3"])
    # Same names → same initial values: the exits change nothing else.
    for path, leaf in by_path(p0).items():
        np.testing.assert_array_equal(np.asarray(by_path(params)[path]), np.asarray(leaf))
    for s, w in enumerate((2, 2, 2), start=1):      # Dense(w → 5), PyTorch's Linear init
        head = params[f"exit{s}"]
        assert head["kernel"].shape == (w, 5) and head["bias"].shape == (5,)
        for leaf in (head["kernel"], head["bias"]):
            assert 0 < np.abs(np.asarray(leaf)).max() <= 1 / np.sqrt(w)
    assert count(params) - count(p0) == 3 * (2 * 5 + 5)
    assert model.layer_names() == ["stem", "stage1", "exit1", "stage2", "exit2", "stage3",
                                   "exit3", "stage4", "head"]
    with pytest.raises(ValueError, match="has no exit heads"):
        plain.apply({"params": p0}, X[:2], exits=True)


def test_full_size_exit_param_count():
    p = jax.eval_shape(models.build_model("resnet18", 10, {"early_exits": True}).init,
                       jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    assert count(p) == 11_173_962 + (64 + 128 + 256) * 10 + 3 * 10 == 11_178_472


def _truncated(model, params, e):
    """Exit e (1-based) computed independently: a plain ResNet (no exits) of the first e
    stages, built by hand, whose head is ``exit{e}`` (``head`` itself for the last)."""
    plain = models.build_model("resnet18", model.num_classes, {
        "widths": model.widths[:e], "blocks_per_stage": model.blocks_per_stage[:e]})
    sub = {"stem": params["stem"], **{f"stage{s}": params[f"stage{s}"] for s in range(1, e + 1)},
           "head": params[f"exit{e}" if e < len(model.widths) else "head"]}
    return plain, sub


def test_exit_outputs_against_truncated_models(with_exits):
    model, params, _ = with_exits
    out = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, exits=True))(params, X))
    assert out.shape == (4, 4, 5)
    # exits=False: the head's logits, exactly the output of the same model without exits.
    last = np.asarray(jax.jit(model.apply)({"params": params}, X))
    np.testing.assert_array_equal(out[-1], last)
    plain = model.clone(early_exits=False)
    no_exits = {k: v for k, v in params.items() if not k.startswith("exit")}
    np.testing.assert_array_equal(np.asarray(jax.jit(plain.apply)({"params": no_exits}, X)), last)
    for e in range(1, 5):
        small, sub = _truncated(model, params, e)
        np.testing.assert_allclose(out[e - 1], np.asarray(small.apply({"params": sub}, X)),
                                   rtol=1e-5, atol=1e-5, err_msg=f"exit {e}")
        if e < 4:   # with_depth/depth_params build the same model and tree
            d_model, d_params = model.with_depth(e), model.depth_params(params, e)
            assert d_model.widths == small.widths
            assert d_model.blocks_per_stage == small.blocks_per_stage
            assert sorted(d_params) == sorted(list(sub) + [f"exit{s}" for s in range(1, e)])
            np.testing.assert_allclose(np.asarray(d_model.apply({"params": d_params}, X)),
                                       out[e - 1], rtol=1e-5, atol=1e-5)
    assert model.depth_params(params, 4) is params
    with pytest.raises(ValueError, match=r"depth 5 not in \[1, 4\]"):
        model.with_depth(5)
    with pytest.raises(ValueError, match="needs early_exits=True"):
        plain.depth_params(no_exits, 2)


def test_exit_heads_consume_their_stream_and_shrink_consistently(with_exits):
    model, params, groups = with_exits
    g = {x.name: x for x in groups}
    for s in (1, 2, 3):
        assert (f"exit{s}", "kernel") in {m.path for m in g[f"stream{s}"].consumers}
    assert ("head", "kernel") in {m.path for m in g["stream4"].consumers}
    members = {m.path for x in groups for m in x.members}
    classifiers = ("exit1", "exit2", "exit3", "head")
    assert members == set(by_path(params)) - {(n, "bias") for n in classifiers}
    u = random_units(groups, 5)
    m = units.expand(params, groups, u)
    for grp in groups:   # a kept input channel of every consumer (exits too) is a kept output
        for mem in grp.members:
            leaf = np.asarray(by_path(m)[mem.path])
            along = np.moveaxis(leaf, mem.axis, 0).reshape(leaf.shape[mem.axis], -1).max(1)
            np.testing.assert_array_equal(along, u[grp.name], err_msg=str(mem.path))
    masked = jax.tree_util.tree_map(jnp.multiply, params, m)
    small = model.with_widths(units.kept_sizes(groups, u))
    shrunk = units.shrink(params, groups, u)
    want = jax.eval_shape(small.init, jax.random.PRNGKey(0), X[:1])["params"]
    assert jax.tree_util.tree_map(np.shape, shrunk) == \
        jax.tree_util.tree_map(lambda s: s.shape, want)
    run = jax.jit(lambda mod, p: mod.apply({"params": p}, X, exits=True), static_argnums=0)
    np.testing.assert_allclose(np.asarray(run(small, shrunk)), np.asarray(run(model, masked)),
                               rtol=1e-4, atol=1e-4)
