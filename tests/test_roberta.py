"""RoBERTa classifier: parameter count by hand, the authors' maskable split and θ groups,
the forward pass against NumPy (and Hugging Face when installed), head/MLP unit groups
whose shrunk model equals the masked one, and the Hugging Face weight converter."""
import dataclasses
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import by_path, count, random_units

from fiarse_jax import models
from fiarse_jax.core import masks, units
from fiarse_jax.models import convert_roberta as cr
from fiarse_jax.models.roberta import RobertaClassifier

PAD = 1
V, P, D, H, FF, K, LAYERS = 97, 40, 64, 2, 128, 4, 2       # the tiny test model
TINY = {"size": "tiny", "vocab_size": V, "max_position_embeddings": P}
#: <s>=0 … </s>=2 then padding (id 1); rows of different real lengths.
IDS = np.array([[0, 5, 6, 7, 8, 9, 2, 1, 1, 1],
                [0, 9, 2, 1, 1, 1, 1, 1, 1, 1],
                [0, 4, 5, 6, 7, 8, 9, 10, 11, 2]], np.int32)


def shapes_of(model, length=8):
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, length), jnp.int32))


def random_params(model, seed=0):
    """Parameters in ``model``'s shapes drawn with NumPy (a Flax init compiles for seconds on
    2 cores): kernels N(0, 0.1²), embeddings N(0, 1), biases N(0, 0.1²), LayerNorm
    γ ~ U(0.5, 1.5), so every leaf matters and attention is far from uniform."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = masks.path_names(path)[-1]
        if name == "scale":
            v = rng.uniform(0.5, 1.5, s.shape)
        elif name == "embedding":
            v = rng.normal(0.0, 1.0, s.shape)
        else:
            v = rng.normal(0.0, 0.1, s.shape)
        return jnp.asarray(v, s.dtype)
    return jax.tree_util.tree_map_with_path(draw, shapes_of(model)["params"])


@pytest.fixture(scope="module")
def tiny():
    model = models.build_model("roberta", K, TINY)
    return model, random_params(model)


@pytest.fixture(scope="module")
def tiny_apply(tiny):
    return jax.jit(tiny[0].apply)


# -- architecture -------------------------------------------------------------------------

def test_roberta_base_param_count_equals_hf_by_hand():
    model = models.build_model("roberta", 4, {"size": "roberta_base"})
    variables = shapes_of(model)                      # nothing allocated
    assert set(variables) == {"params"}
    v, p, t, d, ff, n, k = 50265, 514, 1, 768, 3072, 12, 4
    embeddings = v * d + p * d + t * d + 2 * d
    layer = 4 * (d * d + d) + 2 * d + 2 * (d * ff) + ff + d + 2 * d
    head = d * d + d + d * k + k
    assert count(variables) == embeddings + n * layer + head == 124_648_708
    assert model.layer_names() == ["embeddings"] + [f"layer_{i}" for i in range(12)] + ["head"]


def test_tree_layout_is_exactly_the_documented_one(tiny):
    model, params = tiny
    hd = D // H
    want = {("embeddings", "word", "embedding"): (V, D),
            ("embeddings", "position", "embedding"): (P, D),
            ("embeddings", "token_type", "embedding"): (1, D),
            ("embeddings", "norm", "scale"): (D,), ("embeddings", "norm", "bias"): (D,),
            ("head", "dense", "kernel"): (D, D), ("head", "dense", "bias"): (D,),
            ("head", "out_proj", "kernel"): (D, K), ("head", "out_proj", "bias"): (K,)}
    for i in range(LAYERS):
        l = f"layer_{i}"
        for q in ("query", "key", "value"):
            want[(l, "attention", q, "kernel")] = (D, H, hd)
            want[(l, "attention", q, "bias")] = (H, hd)
        want[(l, "attention", "output", "kernel")] = (H, hd, D)
        want[(l, "attention", "output", "bias")] = (D,)
        want[(l, "mlp", "intermediate", "kernel")] = (D, FF)
        want[(l, "mlp", "intermediate", "bias")] = (FF,)
        want[(l, "mlp", "output", "kernel")] = (FF, D)
        want[(l, "mlp", "output", "bias")] = (D,)
        for norm in ("attention_norm", "mlp_norm"):
            want[(l, norm, "scale")] = want[(l, norm, "bias")] = (D,)
    assert {k: tuple(v.shape) for k, v in by_path(params).items()} == want
    assert all(v.dtype == jnp.float32 for v in by_path(params).values())
    small = shapes_of(models.build_model("roberta", 3, {"size": "small"}))["params"]
    assert small["layer_3"]["attention"]["query"]["kernel"].shape == (256, 4, 64)
    assert "layer_4" not in small and small["layer_0"]["mlp"]["intermediate"]["bias"].shape == (1024,)


def test_init_follows_hugging_face():
    """N(0, 0.02²) kernels and embeddings (padding rows 0), zero biases, LayerNorm 1 / 0."""
    model = models.build_model("roberta", K, {**TINY, "num_layers": 1})
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), jnp.asarray(IDS[:1]))
    for path, leaf in by_path(variables["params"]).items():
        leaf = np.asarray(leaf)
        if path[-1] in ("kernel", "embedding"):
            if path[-1] == "embedding" and path[1] in ("word", "position"):
                np.testing.assert_array_equal(leaf[PAD], 0.0, err_msg=str(path))
                leaf = np.delete(leaf, PAD, axis=0)
            if leaf.size >= 1000:
                assert 0.017 < leaf.std() < 0.023 and abs(leaf.mean()) < 0.003, path
        else:
            np.testing.assert_array_equal(leaf, 1.0 if path[-1] == "scale" else 0.0, str(path))


@pytest.mark.parametrize("options,match", [
    ({"size": "huge"}, "unknown RoBERTa size 'huge'"),
    ({"hidden_size": 100}, "hidden_size 100 is not a multiple of num_heads 12"),
    ({"layer_heads": (12, 12)}, r"layer_heads has 2 entries \(12, 12\); expected one per layer \(12\)"),
    ({"layer_intermediate": (-1,) * 12}, "layer_intermediate .* has a negative width"),
    ({"threshold_groups": "fine"}, "unknown threshold_groups 'fine'"),
    ({"max_length": 513}, "sequence length 513 needs 515 position embeddings"),
])
def test_bad_configuration_is_refused(options, match):
    with pytest.raises(ValueError, match=match):
        models.build_model("roberta", 4, options)
    assert models.build_model("roberta", 4, {"max_length": 512}).dims().max_position_embeddings == 514


def test_too_long_input_is_refused(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match="sequence length 39 needs 41 position embeddings"):
        model.apply({"params": params}, np.zeros((1, 39), np.int32))


# -- FIARSE: maskable leaves and θ groups ---------------------------------------------------

def expected_maskable(path, mask_token_type=False, mask_head=False):
    """The authors' text rule, written out leaf by leaf."""
    if path[0] == "embeddings":
        return path[1] in ("word", "position") or (path[1] == "token_type" and mask_token_type)
    if path[0] == "head":
        return mask_head
    return path[1] in ("attention", "mlp") and path[-1] in ("kernel", "bias")


@pytest.mark.parametrize("flags", [{}, {"mask_token_type": True, "mask_head": True}])
def test_maskable_split(tiny, flags):
    model, params = tiny
    model = model.clone(**flags)
    got = dict(zip(by_path(params), masks.maskable_flags(params, model.is_maskable)))
    assert got == {p: expected_maskable(p, **flags) for p in by_path(params)}
    n = sum(int(np.prod(l.shape)) for p, l in by_path(params).items() if got[p])
    per_layer = 4 * (D * D + D) + 2 * D * FF + FF + D
    extra = (D + (D * D + D) + (D * K + K)) if flags else 0    # token type + head
    assert n == V * D + P * D + LAYERS * per_layer + extra
    assert model.is_maskable(("params", "layer_1", "mlp", "output", "bias"))
    with pytest.raises(ValueError, match="'encoder/x' is not a RobertaClassifier parameter path"):
        model.is_maskable(("encoder", "x"))


def test_threshold_groups(tiny):
    model, params = tiny
    coarse = {model.threshold_group(p) for p in by_path(params) if model.is_maskable(p)}
    assert coarse == {"word_embeddings", "position_embeddings", "encoder"}
    fine = model.clone(threshold_groups="per_layer")
    assert {fine.threshold_group(p) for p in by_path(params) if fine.is_maskable(p)} == {
        "word_embeddings", "position_embeddings", "layer_0", "layer_1"}
    every = model.clone(mask_token_type=True, mask_head=True)
    assert {every.threshold_group(p) for p in by_path(params) if every.is_maskable(p)} == {
        "word_embeddings", "position_embeddings", "token_type_embeddings", "encoder", "head"}


@pytest.mark.parametrize("grouping", ["coarse", "per_layer"])
def test_layer_scope_thresholds_match_numpy(tiny, grouping):
    model, params = tiny
    model = model.clone(threshold_groups=grouping)
    ratios = (1.0, 0.3, 1 / 16)
    th = by_path(masks.importance_thresholds(params, ratios, scope="layer",
                                             is_maskable=model.is_maskable,
                                             group_fn=model.threshold_group))

    def group(path):   # independent of the model's method
        if path[0] == "embeddings":
            return path[1]
        return "encoder" if grouping == "coarse" else path[0]

    mags = {}
    for path, leaf in by_path(params).items():
        if expected_maskable(path):
            mags.setdefault(group(path), []).append(np.abs(np.asarray(leaf)).ravel())
    assert len(mags) == (3 if grouping == "coarse" else 2 + LAYERS)
    for path, t in th.items():
        if not expected_maskable(path):
            np.testing.assert_array_equal(np.asarray(t), 0.0)
            continue
        desc = np.sort(np.concatenate(mags[group(path)]))[::-1]
        want = [0.0 if r == 1.0 else desc[math.ceil(r * desc.size - 1e-9) - 1] for r in ratios]
        np.testing.assert_array_equal(np.asarray(t), np.asarray(want, np.float32), str(path))


# -- forward pass ----------------------------------------------------------------------------

def numpy_forward(params, ids, pad=PAD, eps=1e-5):
    """HF RoBERTa's eval forward in float64, written from its definition: flat Linear
    projections split into heads, -inf on padded keys, erf GELU, head on token 0."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    erf = np.vectorize(math.erf)

    def ln(x, n):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * n["scale"] + n["bias"]

    real = ids != pad
    pos = np.cumsum(real, 1) * real + pad
    e = p["embeddings"]
    x = ln(e["word"]["embedding"][ids] + e["position"]["embedding"][pos]
           + e["token_type"]["embedding"][0], e["norm"])
    b, length, d = x.shape
    i = 0
    while f"layer_{i}" in p:
        layer, att = p[f"layer_{i}"], p[f"layer_{i}"]["attention"]

        def heads(name):
            w = att[name]["kernel"].reshape(d, -1)
            y = x @ w + att[name]["bias"].reshape(-1)
            return y.reshape(b, length, att[name]["kernel"].shape[1], -1).transpose(0, 2, 1, 3)
        q, k, v = heads("query"), heads("key"), heads("value")
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
        s = np.where(real[:, None, None, :], s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        ctx = (w @ v).transpose(0, 2, 1, 3).reshape(b, length, -1)
        out = att["output"]
        x = ln(x + ctx @ out["kernel"].reshape(-1, d) + out["bias"], layer["attention_norm"])
        mlp = layer["mlp"]
        h = x @ mlp["intermediate"]["kernel"] + mlp["intermediate"]["bias"]
        h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
        x = ln(x + h @ mlp["output"]["kernel"] + mlp["output"]["bias"], layer["mlp_norm"])
        i += 1
    hd = p["head"]
    h = np.tanh(x[:, 0] @ hd["dense"]["kernel"] + hd["dense"]["bias"])
    return h @ hd["out_proj"]["kernel"] + hd["out_proj"]["bias"]


def test_forward_matches_numpy_with_padding(tiny, tiny_apply):
    model, params = tiny
    got = np.asarray(tiny_apply({"params": params}, IDS))
    assert got.shape == (3, K)
    np.testing.assert_allclose(got, numpy_forward(params, IDS), rtol=1e-4, atol=1e-4)
    # Padding does not matter: the same rows padded to 16 give the same logits, and a
    # row's logits do not depend on the other rows of its batch.
    longer = np.pad(IDS, ((0, 0), (0, 6)), constant_values=PAD)
    np.testing.assert_allclose(np.asarray(tiny_apply({"params": params}, longer)), got,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(tiny_apply({"params": params}, IDS[1:2, :4])), got[1:2],
                               rtol=1e-5, atol=1e-5)
    # ... while a real token does.
    changed = IDS.copy()
    changed[0, 3] = 50
    assert not np.allclose(np.asarray(tiny_apply({"params": params}, changed))[0], got[0],
                           atol=1e-3)


def test_bfloat16_params_compute_in_bfloat16(tiny, tiny_apply):
    """A client's ``compute_dtype`` casts the params; the model follows their dtype."""
    _, params = tiny
    half = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    got = tiny_apply({"params": half}, IDS)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), numpy_forward(params, IDS), atol=0.15)


# -- structured sub-models: heads and MLP units ----------------------------------------------

def test_unit_groups_are_heads_and_mlp_units(tiny):
    model, params = tiny
    groups = model.unit_groups(params)
    assert [(g.name, g.size) for g in groups] == [
        ("layer_0.heads", H), ("layer_0.mlp", FF), ("layer_1.heads", H), ("layer_1.mlp", FF)]
    att = ("layer_0", "attention")
    assert {(m.path, m.axis) for m in groups[0].producers} == {
        (att + (q, "kernel"), 1) for q in ("query", "key", "value")} | {
        (att + (q, "bias"), 0) for q in ("query", "key", "value")}
    assert [(m.path, m.axis) for m in groups[0].consumers] == [(att + ("output", "kernel"), 0)]
    # Dropping head 0 of layer 0 zeroes exactly its q/k/v slices and its output rows.
    u = {g.name: np.ones(g.size, np.float32) for g in groups}
    u["layer_0.heads"] = np.array([0.0, 1.0], np.float32)
    m = by_path(units.expand(params, groups, u))
    for path, leaf in m.items():
        leaf = np.asarray(leaf)
        if path[:2] == att and path[2] != "output":
            sl = leaf[:, 0] if path[-1] == "kernel" else leaf[0]
        elif path == att + ("output", "kernel"):
            sl = leaf[0]
        else:
            np.testing.assert_array_equal(leaf, 1.0, str(path))
            continue
        np.testing.assert_array_equal(sl, 0.0, str(path))
        assert leaf.sum() == leaf.size / 2, path
    norms = units.unit_norms(params, groups)
    q = np.asarray(params["layer_0"]["attention"]["query"]["kernel"])
    assert norms["layer_0.heads"].shape == (H,) and float(norms["layer_0.heads"][0]) > np.sqrt(
        (q[:, 0] ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_shrunk_model_equals_masked_full(tiny, tiny_apply, seed):
    """A dropped head's q/k/v and output rows, and a dropped MLP unit's incoming weights,
    bias and outgoing row, are all 0 in the masked model, so it adds exactly 0 to the
    residual stream; the shrunk model simply does not compute it."""
    model, params = tiny
    groups = model.unit_groups(params)
    u = random_units(groups, seed)
    u["layer_0.heads"] = np.eye(H, dtype=np.float32)[seed]      # one head kept, one dropped
    masked = jax.tree_util.tree_map(jnp.multiply, params, units.expand(params, groups, u))
    sizes = units.kept_sizes(groups, u)
    small = model.with_widths(sizes)
    assert small.dims().layer_heads == (1, sizes["layer_1.heads"])
    assert small.dims().layer_intermediate == (sizes["layer_0.mlp"], sizes["layer_1.mlp"])
    shrunk = units.shrink(params, groups, u)
    want = shapes_of(small)["params"]
    assert jax.tree_util.tree_map(np.shape, shrunk) == jax.tree_util.tree_map(lambda s: s.shape, want)
    assert shrunk["layer_0"]["attention"]["key"]["kernel"].shape == (D, 1, D // H)   # head_dim kept
    np.testing.assert_allclose(np.asarray(jax.jit(small.apply)({"params": shrunk}, IDS)),
                               np.asarray(tiny_apply({"params": masked}, IDS)), rtol=1e-5, atol=1e-5)


def test_with_widths_and_registry_fields(tiny):
    model, params = tiny
    groups = model.unit_groups(params)
    full = model.with_widths(units.kept_sizes(groups, {g.name: np.ones(g.size) for g in groups}))
    assert full.dims() == model.dims()
    part = model.with_widths({"layer_1.mlp": 7})
    assert part.dims().layer_heads == (H, H) and part.dims().layer_intermediate == (FF, 7)
    fields = {f.name for f in dataclasses.fields(RobertaClassifier)}
    assert {"size", "layer_heads", "layer_intermediate", "threshold_groups", "mask_token_type",
            "mask_head", "max_length", "num_classes"} <= fields
    built = models.build_model("roberta", 3, {"size": "tiny", "layer_heads": [1, 2]})
    assert built.layer_heads == (1, 2) and built.num_classes == 3


# -- Hugging Face weights ---------------------------------------------------------------------

def hf_tensors(seed=0, layers=LAYERS, d=D, prefix="roberta.", head=True, extras=True):
    """A checkpoint dict with Hugging Face names and layouts ([out, in] Linear weights)."""
    rng = np.random.default_rng(seed)
    t = {}

    def put(name, *shape):
        t[name] = rng.normal(size=shape).astype(np.float32)

    def linear(name, out, inp):
        put(name + ".weight", out, inp)
        put(name + ".bias", out)

    e = prefix + "embeddings."
    put(e + "word_embeddings.weight", V, d)
    put(e + "position_embeddings.weight", P, d)
    put(e + "token_type_embeddings.weight", 1, d)
    put(e + "LayerNorm.weight", d)
    put(e + "LayerNorm.bias", d)
    for i in range(layers):
        x = f"{prefix}encoder.layer.{i}."
        for q in ("query", "key", "value"):
            linear(x + f"attention.self.{q}", d, d)
        linear(x + "attention.output.dense", d, d)
        put(x + "attention.output.LayerNorm.weight", d)
        put(x + "attention.output.LayerNorm.bias", d)
        linear(x + "intermediate.dense", FF, d)
        linear(x + "output.dense", d, FF)
        put(x + "output.LayerNorm.weight", d)
        put(x + "output.LayerNorm.bias", d)
    if head:
        linear("classifier.dense", d, d)
        linear("classifier.out_proj", K, d)
    if extras:
        t[e + "position_ids"] = np.arange(P, dtype=np.int64)[None]
        linear(prefix + "pooler.dense", d, d)
    return t


def save(tmp_path, tensors, name="model.safetensors"):
    safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="needs safetensors")
    path = tmp_path / name
    safetensors_numpy.save_file(tensors, str(path))
    return path


def test_converter_puts_every_tensor_in_place(tiny, tmp_path):
    model, template = tiny
    t = hf_tensors()
    params, report = cr.load_hf_roberta(save(tmp_path, t), template)
    hd = D // H
    got = jax.tree_util.tree_map(np.asarray, params)
    e = got["embeddings"]
    np.testing.assert_array_equal(e["word"]["embedding"], t["roberta.embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(e["position"]["embedding"],
                                  t["roberta.embeddings.position_embeddings.weight"])
    np.testing.assert_array_equal(e["token_type"]["embedding"],
                                  t["roberta.embeddings.token_type_embeddings.weight"])
    np.testing.assert_array_equal(e["norm"]["scale"], t["roberta.embeddings.LayerNorm.weight"])
    np.testing.assert_array_equal(e["norm"]["bias"], t["roberta.embeddings.LayerNorm.bias"])
    for i in range(LAYERS):
        x, a, m = f"roberta.encoder.layer.{i}.", got[f"layer_{i}"]["attention"], got[f"layer_{i}"]["mlp"]
        for q in ("query", "key", "value"):
            w, b = t[x + f"attention.self.{q}.weight"], t[x + f"attention.self.{q}.bias"]
            np.testing.assert_array_equal(a[q]["kernel"].reshape(D, D), w.T)
            np.testing.assert_array_equal(a[q]["kernel"][:, 1, 3], w[hd + 3])   # head 1, dim 3
            np.testing.assert_array_equal(a[q]["bias"].reshape(-1), b)
        w = t[x + "attention.output.dense.weight"]
        np.testing.assert_array_equal(a["output"]["kernel"].reshape(D, D), w.T)
        np.testing.assert_array_equal(a["output"]["kernel"][1, 3], w[:, hd + 3])
        np.testing.assert_array_equal(a["output"]["bias"], t[x + "attention.output.dense.bias"])
        np.testing.assert_array_equal(m["intermediate"]["kernel"], t[x + "intermediate.dense.weight"].T)
        np.testing.assert_array_equal(m["intermediate"]["bias"], t[x + "intermediate.dense.bias"])
        np.testing.assert_array_equal(m["output"]["kernel"], t[x + "output.dense.weight"].T)
        np.testing.assert_array_equal(m["output"]["bias"], t[x + "output.dense.bias"])
        for ours, hf in (("attention_norm", "attention.output.LayerNorm"), ("mlp_norm", "output.LayerNorm")):
            np.testing.assert_array_equal(got[f"layer_{i}"][ours]["scale"], t[x + hf + ".weight"])
            np.testing.assert_array_equal(got[f"layer_{i}"][ours]["bias"], t[x + hf + ".bias"])
    for ours, hf in (("dense", "classifier.dense"), ("out_proj", "classifier.out_proj")):
        np.testing.assert_array_equal(got["head"][ours]["kernel"], t[hf + ".weight"].T)
        np.testing.assert_array_equal(got["head"][ours]["bias"], t[hf + ".bias"])
    assert sorted(report.loaded) == sorted("/".join(p) for p in by_path(template))
    assert not report.kept_from_template
    assert set(report.ignored) == {"roberta.embeddings.position_ids", "roberta.pooler.dense.weight",
                                   "roberta.pooler.dense.bias"}
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(template)
    # Shapes alone (no init) suffice when the checkpoint has the head too...
    from_shapes, _ = cr.load_hf_roberta(tmp_path / "model.safetensors", shapes_of(model)["params"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_shapes, params)
    # ... and not when the head would have to come from the template.
    del t["classifier.dense.weight"]
    with pytest.raises(ValueError, match="head/dense/kernel, head/dense/bias not taken from "
                                         "the checkpoint and the template has only shapes"):
        cr.load_hf_roberta(save(tmp_path, t, "headless.safetensors"), shapes_of(model)["params"])


def test_converter_bare_model_keeps_template_head(tiny, tmp_path):
    """A ``RobertaModel`` checkpoint (no prefix, no classifier) in a directory; also a
    classifier with another number of classes: the head comes from the template."""
    model, template = tiny
    t = hf_tensors(prefix="", head=False)
    (tmp_path / "bare").mkdir()
    save(tmp_path / "bare", t)
    params, report = cr.load_hf_roberta(tmp_path / "bare", {"params": template})
    params = params["params"]
    np.testing.assert_array_equal(np.asarray(params["layer_1"]["mlp"]["output"]["kernel"]),
                                  t["encoder.layer.1.output.dense.weight"].T)
    for leaf in ("dense", "out_proj"):
        np.testing.assert_array_equal(np.asarray(params["head"][leaf]["kernel"]),
                                      np.asarray(template["head"][leaf]["kernel"]))
    assert "head/dense: kept from the template (missing classifier.dense.weight" in report.summary()
    assert len(report.kept_from_template) == 4
    other = hf_tensors()
    other["classifier.out_proj.weight"] = other["classifier.out_proj.weight"][:2]
    other["classifier.out_proj.bias"] = other["classifier.out_proj.bias"][:2]
    params, report = cr.load_hf_roberta(save(tmp_path, other, "two.safetensors"), template)
    np.testing.assert_array_equal(np.asarray(params["head"]["dense"]["kernel"]),
                                  other["classifier.dense.weight"].T)
    np.testing.assert_array_equal(np.asarray(params["head"]["out_proj"]["bias"]),
                                  np.asarray(template["head"]["out_proj"]["bias"]))
    assert report.kept_from_template == ["head/out_proj/kernel", "head/out_proj/bias"]
    assert "checkpoint (2, 64), model (4, 64)" in report.summary()


def test_converter_refuses_what_does_not_fit(tiny, tmp_path):
    _, template = tiny
    with pytest.raises(ValueError, match=r"(?s)checkpoint has 1 encoder layers, the model 2.*"
                                         r"missing encoder\.layer\.1\.attention\.self\.query\.weight"):
        cr.load_hf_roberta(save(tmp_path, hf_tensors(layers=1), "shallow.safetensors"), template)
    with pytest.raises(ValueError, match=r"(?s)shape mismatch embeddings\.word_embeddings\.weight: "
                                         r"checkpoint \(97, 32\), model \(97, 64\).*"
                                         r"shape mismatch encoder\.layer\.1\.output\.dense\.weight"):
        cr.load_hf_roberta(save(tmp_path, hf_tensors(d=32), "narrow.safetensors"), template)
    t = hf_tensors()
    del t["roberta.embeddings.LayerNorm.weight"]
    with pytest.raises(ValueError, match=r"missing embeddings\.LayerNorm\.weight"):
        cr.load_hf_roberta(save(tmp_path, t, "missing.safetensors"), template)
    deep = save(tmp_path, hf_tensors(layers=3), "deep.safetensors")
    with pytest.raises(ValueError, match="checkpoint has 3 encoder layers, the model 2; "
                                         "pass num_layers=2"):
        cr.load_hf_roberta(deep, template)
    params, report = cr.load_hf_roberta(deep, template, num_layers=2)    # explicit truncation
    assert "took the first 2 of the checkpoint's 3 encoder layers" in report.summary()
    with pytest.raises(FileNotFoundError, match="no safetensors checkpoint"):
        cr.load_hf_roberta(tmp_path / "nowhere", template)


def test_find_cached_checkpoint_honours_hf_env(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert cr.hf_hub_cache() == tmp_path / "home" / "hub"
    assert cr.find_cached_checkpoint() is None
    repo = tmp_path / "home" / "hub" / "models--roberta-base"
    for rev in ("aaa", "bbb"):
        (repo / "snapshots" / rev).mkdir(parents=True)
        (repo / "snapshots" / rev / "model.safetensors").write_bytes(b"x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaa\n")
    assert cr.find_cached_checkpoint() == repo / "snapshots" / "aaa" / "model.safetensors"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert cr.find_cached_checkpoint() is None
    with pytest.raises(FileNotFoundError, match="'roberta-base' is neither a file nor a "
                                                "directory, and not in the Hugging Face cache"):
        cr.load_pretrained({})


def test_model_loads_pretrained_by_path_or_cached_repo_id(tiny, tmp_path, monkeypatch):
    """``RobertaClassifier.load_pretrained`` (what training calls for ``model.pretrained``)."""
    model, template = tiny
    t = hf_tensors(layers=3, head=False)
    snap = tmp_path / "hub" / "models--org--tiny-roberta" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    save(snap, t)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="checkpoint has 3 encoder layers, the model 2"):
        model.load_pretrained("org/tiny-roberta", template)
    shallow = model.clone(num_layers=2)            # an explicit override takes the first layers
    for source in ("org/tiny-roberta", str(snap)):
        params = shallow.load_pretrained(source, template)
        np.testing.assert_array_equal(np.asarray(params["layer_1"]["mlp"]["output"]["bias"]),
                                      t["roberta.encoder.layer.1.output.dense.bias"])
        np.testing.assert_array_equal(np.asarray(params["head"]["out_proj"]["kernel"]),
                                      np.asarray(template["head"]["out_proj"]["kernel"]))
    with pytest.raises(OSError, match="'org/other' is neither a file nor a directory"):
        model.load_pretrained("org/other", template)

    # download=True: fetched through huggingface_hub when the cache lacks it (faked here),
    # and a clear error at once when the hub cannot be reached.
    from fiarse_jax.utils import hub
    fetched = []
    monkeypatch.setattr(hub, "online", lambda timeout=5.0: True)
    monkeypatch.setitem(sys.modules, "huggingface_hub", type(
        "FakeHub", (), {"hf_hub_download": staticmethod(
            lambda repo, name: fetched.append((repo, name)) or str(snap / name))}))
    params = shallow.load_pretrained("org/elsewhere", template, download=True)
    assert fetched == [("org/elsewhere", "model.safetensors")]
    np.testing.assert_array_equal(np.asarray(params["layer_0"]["mlp"]["output"]["bias"]),
                                  t["roberta.encoder.layer.0.output.dense.bias"])
    monkeypatch.setattr(hub, "online", lambda timeout=5.0: False)
    with pytest.raises(OSError, match="huggingface.co cannot be reached"):
        shallow.load_pretrained("org/elsewhere", template, download=True)


def test_logits_equal_hugging_face(tiny, tiny_apply, tmp_path):
    torch = pytest.importorskip("torch", reason="the Hugging Face comparison needs torch")
    transformers = pytest.importorskip("transformers", reason="the comparison needs transformers")
    _, template = tiny
    cfg = transformers.RobertaConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=H,
        intermediate_size=FF, max_position_embeddings=P, type_vocab_size=1, pad_token_id=PAD,
        bos_token_id=0, eos_token_id=2, num_labels=K, hidden_act="gelu", layer_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = transformers.RobertaForSequenceClassification(cfg).eval()
    with torch.no_grad():            # far from HF's tiny init, so the comparison has teeth
        for name, p in hf.named_parameters():
            p.normal_(0.0, 0.2)
            if "LayerNorm.weight" in name:
                p.add_(1.0)
    import inspect
    kwargs = ({"safe_serialization": True}
              if "safe_serialization" in inspect.signature(hf.save_pretrained).parameters else {})
    hf.save_pretrained(tmp_path, **kwargs)
    params, report = cr.load_hf_roberta(tmp_path, template)
    assert not report.kept_from_template
    with torch.no_grad():
        want = hf(torch.tensor(IDS, dtype=torch.long),
                  attention_mask=torch.tensor(IDS != PAD, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(tiny_apply({"params": params}, IDS)), want, atol=1e-5)
