"""Structured policies: masks against independent NumPy constructions, shape consistency,
and the physically shrunk dense sub-model against the masked full model.

MLP 5 → 12 → 8 → 3 at capacities (1, 1/2, 1/4): N = 72 + 104 + 27 = 203 parameters, a
sub-model at widths (k0, k1) holds 6·k0 + k0·k1 + 4·k1 + 3. ``budget="width"`` keeps
⌈r·C⌉: (12, 8), (6, 4), (3, 2). ``budget="params"`` (default) keeps the common-width
grid point closest to ⌈r·N⌉ = 203, 102, 51: (12, 8) → 203; (7, 5) → 100 (w = 7/12; the
next point w = 5/8 gives (8, 5) → 111); (4, 3) → 51 exactly (w = 1/3).
"""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiarse_jax import models, policies
from fiarse_jax.core import units

CAPS = (1.0, 0.5, 0.25)
#: kept units (Dense_0, Dense_1) per level and budget on the (12, 8) MLP (module docstring)
KEPT = {"width": [(12, 8), (6, 4), (3, 2)], "params": [(12, 8), (7, 5), (4, 3)]}


def mlp_held(k0, k1):
    return 6 * k0 + k0 * k1 + 4 * k1 + 3


def mlp_setup(hidden=(12, 8)):
    model = models.build_model("mlp", 3, {"hidden_sizes": hidden})
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))["params"]
    return model, params, model.unit_groups(params)


def cnn_setup():
    model = models.build_model("cnn", 4, {"features": (6, 10), "hidden_sizes": (7,)})
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    return model, params, model.unit_groups(params)


def roberta_setup():
    """The tiny RoBERTa (2 layers, 2 heads of 32, 128 MLP units) with 4 heads / 16 units
    per layer, so that the capacity levels keep different numbers of each."""
    model = models.build_model("roberta", 4, {"size": "tiny", "num_heads": 4,
                                              "intermediate_size": 16, "vocab_size": 50})
    params = model.init(jax.random.PRNGKey(0), jnp.full((1, 6), 5, jnp.int32))["params"]
    return model, params, model.unit_groups(params)


def setup_input(setup):
    """A batch of 4 inputs for the model of ``setup`` (token ids with padding for RoBERTa)."""
    if setup is roberta_setup:
        ids = jax.random.randint(jax.random.PRNGKey(3), (4, 6), 5, 50)
        return ids.at[0, 4:].set(1).at[:, 0].set(0)
    shape = (5,) if setup is mlp_setup else (8, 8, 1)
    return jax.random.normal(jax.random.PRNGKey(3), (4,) + shape)


def _leaf(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def spec_for(policy, params, level, round_index=0, key=None):
    state = policy.prepare(params, round_index, jax.random.PRNGKey(0))
    return policy.client_spec(state, level, key if key is not None else jax.random.PRNGKey(0))


def np_units(spec):
    return {k: np.asarray(v) for k, v in spec["units"].items()}


@pytest.mark.parametrize("budget", ["params", "width"])
def test_heterofl_keeps_leading_units_and_full_io(budget):
    model, params, groups = mlp_setup()
    pol = policies.build_policy("heterofl", CAPS, {"scaler": False, "budget": budget},
                                unit_groups=groups)
    for lvl, r in enumerate(CAPS):
        spec = spec_for(pol, params, lvl)
        m = pol.mask(params, spec)
        k0, k1 = KEPT[budget][lvl]
        if budget == "width":
            assert (k0, k1) == (math.ceil(12 * r), math.ceil(8 * r))
        else:
            held = sum(float(x.sum()) for x in jax.tree_util.tree_leaves(m))
            assert mlp_held(k0, k1) == int(held)
        ref0 = np.zeros((5, 12)); ref0[:, :k0] = 1          # inputs (image) all kept
        ref1 = np.zeros((12, 8)); ref1[:k0, :k1] = 1
        ref2 = np.zeros((8, 3)); ref2[:k1, :] = 1            # class outputs all kept
        np.testing.assert_array_equal(np.asarray(m["Dense_0"]["kernel"]), ref0)
        np.testing.assert_array_equal(np.asarray(m["Dense_1"]["kernel"]), ref1)
        np.testing.assert_array_equal(np.asarray(m["Dense_2"]["kernel"]), ref2)
        np.testing.assert_array_equal(np.asarray(m["Dense_2"]["bias"]), 1.0)


@pytest.mark.parametrize("budget", ["params", "width"])
@pytest.mark.parametrize("round_index", [0, 1, 11, 12, 13, 25])
def test_fedrolex_window_rolls_and_wraps(round_index, budget):
    _, params, groups = mlp_setup()
    pol = policies.build_policy("fedrolex", CAPS, {"budget": budget}, unit_groups=groups)
    spec = spec_for(pol, params, 2, round_index=round_index)   # r = 1/4
    for (g, c), k in zip((("Dense_0", 12), ("Dense_1", 8)), KEPT[budget][2]):
        expected = np.zeros(c)
        expected[np.roll(np.arange(c), -(round_index % c))[:k]] = 1
        np.testing.assert_array_equal(np_units(spec)[g], expected)
    if round_index == 11:  # C−1 for the 12-unit layer: the window wraps to {11, 0, 1(, 2)}
        np.testing.assert_array_equal(np.flatnonzero(np_units(spec)["Dense_0"]),
                                      [0, 1, 11] if budget == "width" else [0, 1, 2, 11])


@pytest.mark.parametrize("budget", ["params", "width"])
def test_fed_dropout_counts_and_determinism(budget):
    _, params, groups = mlp_setup()
    pol = policies.build_policy("fed_dropout", CAPS, {"budget": budget}, unit_groups=groups)
    state = pol.prepare(params, 0, jax.random.PRNGKey(0))
    draw = lambda lvl, seed: np_units(pol.client_spec(state, lvl, jax.random.PRNGKey(seed)))  # noqa: E731
    for lvl in range(len(CAPS)):
        u = draw(lvl, 5)
        assert (u["Dense_0"].sum(), u["Dense_1"].sum()) == KEPT[budget][lvl]
    np.testing.assert_array_equal(draw(2, 5)["Dense_0"], draw(2, 5)["Dense_0"])
    picks = {tuple(draw(2, s)["Dense_0"]) for s in range(20)}
    assert len(picks) > 5          # different clients/rounds get different units
    # Under vmap with traced levels, the same counts.
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    specs = jax.vmap(pol.client_spec, in_axes=(None, 0, 0))(state, jnp.arange(3), keys)
    np.testing.assert_array_equal(np.asarray(specs["units"]["Dense_1"]).sum(1),
                                  [k1 for _, k1 in KEPT[budget]])


@pytest.mark.parametrize("budget", ["params", "width"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_fiarse_neuron_ranks_units_by_l2_norm(scope, budget):
    _, params, groups = mlp_setup()
    pol = policies.build_policy("fiarse_neuron", CAPS, {"scope": scope, "budget": budget},
                                unit_groups=groups)
    k0 = np.asarray(params["Dense_0"]["kernel"]); b0 = np.asarray(params["Dense_0"]["bias"])
    k1 = np.asarray(params["Dense_1"]["kernel"]); b1 = np.asarray(params["Dense_1"]["bias"])
    n0 = np.sqrt((k0 ** 2).sum(0) + b0 ** 2)
    n1 = np.sqrt((k1 ** 2).sum(0) + b1 ** 2)
    for lvl, r in enumerate(CAPS):
        spec = np_units(spec_for(pol, params, lvl))
        if scope == "layer":
            c0, c1 = KEPT[budget][lvl]
            for g, norms, c in (("Dense_0", n0, c0), ("Dense_1", n1, c1)):
                np.testing.assert_array_equal(np.flatnonzero(spec[g]), np.sort(np.argsort(-norms)[:c]))
            continue
        rms = np.concatenate([n0 / np.sqrt(6), n1 / np.sqrt(13)])   # fan-in: 5 + bias, 12 + bias
        order = np.argsort(-rms, kind="stable")
        if budget == "width":
            p = math.ceil(20 * r)                                   # top ⌈r·U⌉ units
        else:   # the prefix whose held count (≥ 1 unit per layer) is closest to ⌈r·N⌉
            held = [mlp_held(max(1, int((order[:q] < 12).sum())),
                             max(1, int((order[:q] >= 12).sum()))) for q in range(1, 21)]
            budget_n = math.ceil(r * 203)
            p = 1 + min(range(20), key=lambda q: (abs(held[q] - budget_n), held[q]))
        top = set(order[:p])
        got = set(np.flatnonzero(spec["Dense_0"])) | {12 + i for i in np.flatnonzero(spec["Dense_1"])}
        best = {int(np.argmax(n0)), 12 + int(np.argmax(n1))}
        assert got == top | best, (r, budget)


def test_fedavg_reference_policies():
    _, params, groups = mlp_setup()
    full = policies.build_policy("fedavg_full", CAPS, unit_groups=groups)
    small = policies.build_policy("fedavg_smallest", CAPS, unit_groups=groups)
    hetero = policies.build_policy("heterofl", (0.25,), {"scaler": False}, unit_groups=groups)
    for lvl in range(3):
        assert all(float(x.min()) == 1.0 for x in jax.tree_util.tree_leaves(
            full.mask(params, spec_for(full, params, lvl))))
        chex.assert_trees_all_equal(small.mask(params, spec_for(small, params, lvl)),
                                    hetero.mask(params, spec_for(hetero, params, 0)))


@pytest.mark.parametrize("setup", [mlp_setup, cnn_setup, roberta_setup])
@pytest.mark.parametrize("method", ["heterofl", "fedrolex", "fed_dropout", "fiarse_neuron"])
def test_masks_are_shape_consistent_and_shrink_exactly(setup, method):
    model, params, groups = setup()
    pol = policies.build_policy(method, CAPS, unit_groups=groups)
    x = setup_input(setup)
    for lvl in range(len(CAPS)):
        spec = spec_for(pol, params, lvl, round_index=7, key=jax.random.PRNGKey(lvl))
        m = pol.mask(params, spec)
        u = np_units(spec)
        for g in groups:   # a consumer's kept inputs are exactly the producer's kept units
            for c in g.consumers:
                leaf = np.asarray(_leaf(m, c.path))
                along = np.moveaxis(leaf, c.axis, 0).reshape(leaf.shape[c.axis], -1).max(1)
                np.testing.assert_array_equal(along, np.tile(u[g.name], c.tile))
        masked = jax.tree_util.tree_map(lambda p, q: p * q, params, m)
        small = model.with_widths(units.kept_sizes(groups, u))
        shrunk = units.shrink(params, groups, u)
        assert sum(v.size for v in jax.tree_util.tree_leaves(shrunk)) == \
            int(sum(float(v.sum()) for v in jax.tree_util.tree_leaves(m)))
        np.testing.assert_allclose(np.asarray(small.apply({"params": shrunk}, x)),
                                   np.asarray(model.apply({"params": masked}, x)),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", ["params", "width"])
def test_heterofl_scaler_scales_hidden_outputs_by_one_over_the_rate(budget):
    """The rate is the width a layer runs at: k/C per layer under ``budget="params"``
    (4/12 and 3/8 at r = 1/4), r itself under ``budget="width"`` (HeteroFL's model rate)."""
    model, params, groups = mlp_setup()
    pol = policies.build_policy("heterofl", CAPS, {"scaler": True, "budget": budget},
                                unit_groups=groups)
    spec = spec_for(pol, params, 2)     # r = 1/4
    rate0, rate1 = (0.25, 0.25) if budget == "width" else (4 / 12, 3 / 8)
    x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    m = pol.mask(params, spec)
    p = {k: {n: np.asarray(v) * np.asarray(m[k][n]) for n, v in d.items()} for k, d in params.items()}
    relu = lambda z: np.maximum(z, 0)   # noqa: E731
    h0 = relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]) / rate0
    h1 = relu(h0 @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]) / rate1
    ref = h1 @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"]
    got = model.apply({"params": pol.apply(params, spec)}, x)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_structured_methods_need_unit_groups():
    with pytest.raises(ValueError, match="'heterofl' needs a model that declares its units"):
        policies.build_policy("heterofl", CAPS)


def test_heterofl_on_roberta_keeps_leading_heads_and_units_only():
    """Per layer: the first ⌈r·4⌉ heads (their query/key/value columns and output rows)
    and the first ⌈r·16⌉ MLP units (width ratios: ``budget="width"``); embeddings,
    LayerNorms and the head stay whole."""
    model, params, groups = roberta_setup()
    pol = policies.build_policy("heterofl", CAPS, {"scaler": False, "budget": "width"},
                                unit_groups=groups)
    for lvl, r in enumerate(CAPS):
        m = pol.mask(params, spec_for(pol, params, lvl))
        h, u = math.ceil(4 * r), math.ceil(16 * r)
        for i in range(2):
            att, mlp = m[f"layer_{i}"]["attention"], m[f"layer_{i}"]["mlp"]
            heads = np.zeros((64, 4, 16)); heads[:, :h] = 1        # [d, H, head_dim]
            out = np.zeros((4, 16, 64)); out[:h] = 1
            for name in ("query", "key", "value"):
                np.testing.assert_array_equal(np.asarray(att[name]["kernel"]), heads)
                np.testing.assert_array_equal(np.asarray(att[name]["bias"]), heads[0])
            np.testing.assert_array_equal(np.asarray(att["output"]["kernel"]), out)
            np.testing.assert_array_equal(np.asarray(att["output"]["bias"]), 1.0)
            inter = np.zeros((64, 16)); inter[:, :u] = 1
            np.testing.assert_array_equal(np.asarray(mlp["intermediate"]["kernel"]), inter)
            np.testing.assert_array_equal(np.asarray(mlp["output"]["kernel"]), inter.T)
        for top in ("embeddings", "head"):
            assert all(float(x.min()) == 1.0 for x in jax.tree_util.tree_leaves(m[top]))
