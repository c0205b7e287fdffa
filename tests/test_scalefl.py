"""ScaleFL-style policy (width + depth, early exits, self-distillation) against NumPy
references and hand-worked numbers on a tiny MLP and (below) a narrow ResNet-18 with exits.

Tiny model: MLP 5 → 8 → 6 → 4 → 3 with exits after the first two hidden layers:
  Dense_0 5·8+8 = 48, Dense_1 8·6+6 = 54, Dense_2 6·4+4 = 28, Dense_3 4·3+3 = 15,
  Exit_0 8·3+3 = 27, Exit_1 6·3+3 = 21;  N = 193.
Capacities (1, 1/4, 0.11), depth exponent ½, L = 3: d = ⌈√r·3⌉ = 3, 2 (1.5), 1 (0.995).
Every parameter is maskable here (no BN), so the budget is ⌈r·N⌉ of all 193; the width is
the grid point whose held count is closest to it (a tie → the smaller).
  r = 1/4 (budget ⌈48.25⌉ = 49), d = 2, widths (k0, k1) = (⌈8w⌉, ⌈6w⌉):
    held = 6·k0 [Dense_0] + k0·k1 + k1 [Dense_1] + 3·k0 + 3 [Exit_0] + 3·k1 + 3 [Exit_1]
    w = 1/3 → (3, 2): 18 + 8 + 12 + 9 = 47 (−2); the next ratio 3/8 → (3, 3): 54 (+5).
  r = 0.11 (budget ⌈21.23⌉ = 22), d = 1: held = 6·k0 + 3·k0 + 3; k0 = 2 → 21, k0 = 3 → 30.
"""
import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiarse_jax import models, policies
from fiarse_jax.core import masks, units
from fiarse_jax.experiment import costs
from fiarse_jax.federated import evaluate
from fiarse_jax.policies import scalefl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import default as default_config  # noqa: E402

from fiarse_jax.experiment import train  # noqa: E402
from fiarse_jax.experiment.config import ConfigError, validate_config  # noqa: E402

CAPS = (1.0, 0.25, 0.11)
HIDDEN = (8, 6, 4)
N = 193
KEPT = {0: (8, 6, 4), 1: (3, 2, 0), 2: (2, 0, 0)}      # kept units per level (hand-worked)
DEPTH = {0: 3, 1: 2, 2: 1}
HELD = {0: 193, 1: 47, 2: 21}


@functools.cache
def init(hidden=HIDDEN, exits=True):
    model = models.build_model("mlp", 3, {"hidden_sizes": hidden, "early_exits": exits})
    return model, jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 5)))["params"]


def setup(opts=None, hidden=HIDDEN, exits=True):
    model, params = init(hidden, exits)
    groups = model.unit_groups(params)
    pol = policies.build_policy("scalefl", CAPS, opts or {}, unit_groups=groups)
    return model, params, groups, pol


def spec_for(pol, params, level):
    state = pol.prepare(params, 0, jax.random.PRNGKey(0))
    return pol.client_spec(state, level, jax.random.PRNGKey(0))


def test_model_without_exits_is_unchanged_and_exits_share_its_layers():
    plain, p0 = init(HIDDEN, False)
    assert sorted(p0) == ["Dense_0", "Dense_1", "Dense_2", "Dense_3"]
    with pytest.raises(ValueError, match="no exit heads"):
        plain.apply({"params": p0}, jnp.zeros((2, 5)), exits=True)
    model, params, groups, _ = setup()
    assert sum(l.size for l in jax.tree_util.tree_leaves(params)) == N
    for k in p0:     # same names → same initial values for the shared layers
        np.testing.assert_array_equal(np.asarray(params[k]["kernel"]), np.asarray(p0[k]["kernel"]))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 5))
    out = model.apply({"params": params}, x, exits=True)
    assert out.shape == (3, 4, 3)
    np.testing.assert_allclose(np.asarray(out[-1]), np.asarray(model.apply({"params": params}, x)))
    # NumPy forward: exit e is a head on hidden layer e's ReLU output.
    p = jax.tree_util.tree_map(np.asarray, params)
    h0 = np.maximum(np.asarray(x) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0)
    h1 = np.maximum(h0 @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], 0)
    np.testing.assert_allclose(np.asarray(out[0]), h0 @ p["Exit_0"]["kernel"] + p["Exit_0"]["bias"],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out[1]), h1 @ p["Exit_1"]["kernel"] + p["Exit_1"]["bias"],
                               rtol=1e-5, atol=1e-5)
    # Exit heads are consumers of their hidden layer's units.
    reads = {g.name: sorted(m.path[0] for m in g.consumers) for g in groups}
    assert reads == {"Dense_0": ["Dense_1", "Exit_0"], "Dense_1": ["Dense_2", "Exit_1"],
                     "Dense_2": ["Dense_3"]}


@pytest.mark.parametrize("level", [0, 1, 2])
def test_masks_by_hand(level):
    _, params, _, pol = setup()
    spec = spec_for(pol, params, level)
    k0, k1, k2 = KEPT[level]
    d = DEPTH[level]
    assert int(spec["depth"]) == d
    np.testing.assert_array_equal(np.asarray(spec["exit_weights"]), np.arange(3) < d)
    ref = {name: {n: np.zeros(np.shape(v)) for n, v in leaves.items()}
           for name, leaves in params.items()}
    ref["Dense_0"]["kernel"][:, :k0] = 1; ref["Dense_0"]["bias"][:k0] = 1
    if d >= 2:
        ref["Dense_1"]["kernel"][:k0, :k1] = 1; ref["Dense_1"]["bias"][:k1] = 1
        ref["Exit_1"]["kernel"][:k1, :] = 1; ref["Exit_1"]["bias"][:] = 1
    if d >= 3:
        ref["Dense_2"]["kernel"][:k1, :k2] = 1; ref["Dense_2"]["bias"][:k2] = 1
        ref["Dense_3"]["kernel"][:k2, :] = 1; ref["Dense_3"]["bias"][:] = 1
    ref["Exit_0"]["kernel"][:k0, :] = 1; ref["Exit_0"]["bias"][:] = 1
    m = pol.mask(params, spec)
    for name in ref:
        for n in ref[name]:
            np.testing.assert_array_equal(np.asarray(m[name][n]), ref[name][n],
                                          err_msg=f"{name}.{n}")
    assert int(sum(float(v.sum()) for v in jax.tree_util.tree_leaves(m))) == HELD[level]


def closest(counts, budget):
    """The width vector whose held count is closest to ``budget`` (a tie → the smaller):
    ``counts`` maps width vectors to held counts."""
    return min(counts, key=lambda k: (abs(counts[k] - budget), counts[k]))


def test_widths_fill_the_budget_against_a_brute_force_search():
    # Independent reference: scan every width ratio on a fine grid with the hand formula.
    def held(d, k):
        k = list(k) + [0] * (3 - len(k))
        ins = [5] + k[:2]
        body = sum(ins[i] * k[i] + k[i] for i in range(d))
        return body + sum(k[e] * 3 + 3 for e in range(d))
    for level, r in enumerate(CAPS):
        d = DEPTH[level]
        assert d == max(1, math.ceil(round(math.sqrt(r) * 3, 6)))
        counts = {}
        for w in np.linspace(1e-4, 1, 20001):
            k = tuple(max(1, math.ceil(round(w * c, 6))) if i < d else 0
                      for i, c in enumerate(HIDDEN))
            counts[k] = held(d, k)
        best = closest(counts, math.ceil(round(r * N, 6)))
        assert best == KEPT[level] and held(d, best) == HELD[level]


def np_objective(z, y, d, kd_weight, t):
    def log_softmax(a):
        a = a - a.max(-1, keepdims=True)
        return a - np.log(np.exp(a).sum(-1, keepdims=True))
    ce = [-log_softmax(z[e])[np.arange(len(y)), y].mean() for e in range(d)]
    loss = np.mean(ce)
    teacher = np.exp(log_softmax(z[d - 1] / t))
    kls = [t * t * (teacher * (np.log(teacher) - log_softmax(z[e] / t))).sum(-1).mean()
           for e in range(d - 1)]
    return loss + (kd_weight * np.mean(kls) if kls else 0.0)


@pytest.mark.parametrize("kd_weight,t", [(1.0, 3.0), (0.5, 1.0), (0.0, 2.0)])
def test_objective_and_readout_match_numpy(kd_weight, t):
    _, params, _, pol = setup({"kd_weight": kd_weight, "temperature": t})
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 7, 3)).astype(np.float32) * 3
    y = rng.integers(0, 3, size=7)
    objective = jax.jit(pol.objective)
    for level in range(3):
        spec = spec_for(pol, params, level)
        d = DEPTH[level]
        got = float(objective(jnp.asarray(z), jnp.asarray(y), spec))
        np.testing.assert_allclose(got, np_objective(z, y, d, kd_weight, t), rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(pol.readout(jnp.asarray(z), spec)), z[d - 1])
    # The teacher gets no gradient from the distillation term.
    spec = spec_for(pol, params, 0)
    g = jax.jit(jax.grad(lambda zz: pol.objective(zz, jnp.asarray(y), spec)))(jnp.asarray(z))
    g_ce = jax.jit(jax.grad(lambda zz: -jax.nn.log_softmax(zz)[:, jnp.arange(7), y].mean()))(
        jnp.asarray(z))
    np.testing.assert_allclose(np.asarray(g[2]), np.asarray(g_ce[2]), rtol=1e-5, atol=1e-7)


def test_vmapped_specs_and_readout():
    _, params, _, pol = setup()
    state = pol.prepare(params, 0, jax.random.PRNGKey(0))
    specs = jax.vmap(pol.client_spec, in_axes=(None, 0, 0))(
        state, jnp.array([2, 0, 1]), jax.random.split(jax.random.PRNGKey(0), 3))
    z = jnp.arange(3 * 2 * 3, dtype=jnp.float32).reshape(3, 2, 3)
    picked = jax.vmap(pol.readout, in_axes=(None, 0))(z, specs)
    np.testing.assert_array_equal(np.asarray(picked), np.asarray(z)[[0, 2, 1]])


@pytest.mark.parametrize("level", [0, 1, 2])
def test_shrunk_dense_submodel_equals_masked_readout(level):
    model, params, groups, pol = setup()
    spec = spec_for(pol, params, level)
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 5))
    masked = pol.apply(params, spec)
    ref = pol.readout(model.apply({"params": masked}, x, exits=True), spec)
    u = {k: np.asarray(v) for k, v in spec["units"].items()}
    small = model.with_widths(units.kept_sizes(groups, u))
    d = int(spec["depth"])
    small, shrunk = small.with_depth(d), small.depth_params(units.shrink(params, groups, u), d)
    assert small.hidden_sizes == KEPT[level][:d]
    assert sum(v.size for v in jax.tree_util.tree_leaves(shrunk)) == HELD[level]
    np.testing.assert_allclose(np.asarray(small.apply({"params": shrunk}, x)), np.asarray(ref),
                               rtol=1e-5, atol=1e-5)


def test_costs_by_hand():
    model, params, groups, pol = setup()
    c = costs.capacity_costs(model, params, pol, pol.prepare(params, 0, None), CAPS,
                             structured=True, unit_groups=groups, x_one=jnp.zeros((1, 5)))

    def flops(widths):   # XLA: dot 2·in·out, bias add out, ReLU out; the readout has no ReLU
        hid = sum(2 * a * b + 2 * b for a, b in zip(widths[:-2], widths[1:-1]))
        return hid + 2 * widths[-2] * widths[-1] + widths[-1]

    expect = {"1": (5, 8, 6, 4, 3), "1/4": (5, 3, 2, 3), "0.11": (5, 2, 3)}
    for level, label in enumerate(("1", "1/4", "0.11")):
        assert c[label]["params_held"] == c[label]["maskable_kept"] == HELD[level]
        assert c[label]["bytes_down"] == c[label]["bytes_up"] == 4 * HELD[level]
        assert c[label]["flops"] == flops(expect[label]), label
        assert c[label]["flops_full"] == flops(expect["1"])
        assert c[label]["flops_basis"] == "shrunk dense"


def test_other_methods_on_an_early_exit_model():
    # HeteroFL masks the exit heads' inputs with their hidden layer; shapes stay consistent.
    model, params, groups, _ = setup()
    het = policies.build_policy("heterofl", (0.5,), {"scaler": False}, unit_groups=groups)
    spec = het.client_spec(het.prepare(params, 0, None), 0, None)
    m = het.mask(params, spec)
    np.testing.assert_array_equal(np.asarray(m["Exit_0"]["kernel"]).max(1), np.arange(8) < 4)
    u = {k: np.asarray(v) for k, v in spec["units"].items()}
    small = model.with_widths(units.kept_sizes(groups, u))
    shrunk = units.shrink(params, groups, u)
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 5))
    masked = jax.tree_util.tree_map(jnp.multiply, params, m)
    np.testing.assert_allclose(np.asarray(small.apply({"params": shrunk}, x, exits=True)),
                               np.asarray(model.apply({"params": masked}, x, exits=True)),
                               rtol=1e-5, atol=1e-5)


def test_bad_setups_raise_clear_errors():
    with pytest.raises(ValueError, match="needs an MLP with early-exit heads"):
        setup(exits=False)
    with pytest.raises(ValueError, match=r"has 1 hidden layer"):
        setup(hidden=(8,))
    cnn = models.build_model("cnn", 3, {"features": (4, 6), "hidden_sizes": (5,)})
    cp = jax.eval_shape(cnn.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    with pytest.raises(ValueError, match="needs an MLP with early-exit heads"):
        policies.build_policy("scalefl", CAPS, unit_groups=cnn.unit_groups(cp))
    with pytest.raises(ValueError, match="needs an MLP with early-exit heads"):
        policies.build_policy("scalefl", CAPS)
    with pytest.raises(ValueError, match="temperature = 0"):
        setup({"temperature": 0})
    cfg = default_config.get_config()
    cfg.method = "scalefl"          # default model: one hidden layer, no exits
    with pytest.raises(ConfigError, match=r"config\.model = .*needs an MLP with early-exit heads"):
        validate_config(cfg)
    cfg.model.hidden_sizes, cfg.model.early_exits = (16, 16), True
    validate_config(cfg)
    cfg.scalefl.kd_weight = -1.0
    with pytest.raises(ConfigError, match=r"config\.scalefl\.kd_weight = -1\.0"):
        validate_config(cfg)


def test_short_run_learns(tmp_path):
    cfg = default_config.get_config()
    cfg.method = "scalefl"
    cfg.model.hidden_sizes, cfg.model.early_exits = (64, 64), True
    cfg.num_rounds, cfg.eval_every = 50, 50
    cfg.engine.strategy = "vmap"    # one compiled round: the fastest here even on CPU
    if "checkpoint_every" in cfg:
        cfg.checkpoint_every = 0
    s = train.train_and_evaluate(cfg, str(tmp_path))
    final = s["final"]
    assert final["global_accuracy"] > 0.8, final          # chance is 0.10
    for label in ("1", "1/4", "1/16"):
        assert final["capacity_global_accuracy"][label] > 0.6, (label, final)
    # MLP 64-64-64 with exits, all parameters maskable: 1/16 holds ≈ 1/16 of them.
    assert abs(s["costs"]["1/16"]["params_held"] / s["num_params"] - 0.0625) <= 0.05 * 0.0625


# ---- ResNet-18 with early exits: exits after stages 1–3, ``head`` last; depth in stages ----
# Narrow model (widths 4-8-8-8, two blocks per stage, 5 classes), hand count at stream
# widths k (block-inner widths equal their stage's, as leading units of equal-size groups):
#   stem 27·k1 + 2·k1; block: 9·c_in·k + 2k (conv1, bn1) + 9·k·k + 2k (conv2, bn2), plus
#   c_in·k + 2k for the projection of stages 2+; exit after stage s: k_s·K + K.
# N = 7,908, of which 280 are BN γ/β (2 per channel of every BN): 7,628 maskable. The
# budget is ⌈r·7,628⌉ maskable parameters, the width the grid point closest to it.
# Levels (1, 1/4, 1/16, 1/64) at a = ½: depth ⌈√r·4⌉ = 4, 2, 1, 1 stages (all / maskable):
#   1/4: budget 1,907 → k = (3, 6): 1,702 / 1,612 (k = (4, 8): 2,806 / 2,666).
#   1/16: budget 477 → k1 = 3: 87 + 348 + 20 = 455 / 425 (k1 = 4: 749 / 709).
#   1/64: budget 120 → k1 = 1: 29 + 44 + 10 = 83 / 73 (k1 = 2: 58 + 160 + 15 = 233 / 213).

R_OPTS = {"widths": (4, 8, 8, 8), "early_exits": True}
R_CAPS = (1.0, 0.25, 1 / 16, 1 / 64)
R_N = 7908
R_MASKABLE = 7628
XR = jax.random.normal(jax.random.PRNGKey(5), (4, 16, 16, 3))


def resnet_held(d, k, num_classes=5, blocks=2, maskable=False):
    """Hand count of a depth-d sub-model at stream widths k (see the comment above); with
    ``maskable`` without the BN γ/β (2 per channel of every BN)."""
    bn = 0 if maskable else 2
    n = 27 * k[0] + bn * k[0]
    c_in = k[0]
    for s in range(d):
        w = k[s]
        for b in range(blocks):
            n += 9 * c_in * w + bn * w + 9 * w * w + bn * w
            if s > 0 and b == 0:
                n += c_in * w + bn * w
            c_in = w
        n += w * num_classes + num_classes
    return n


@functools.cache
def resnet_setup():
    """The narrow ResNet with exits and NumPy-drawn parameters (no init compile)."""
    model = models.build_model("resnet18", 5, R_OPTS)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), XR[:1])["params"]
    rng = np.random.default_rng(0)

    def draw(path, s):
        if path[-1].key == "scale":                     # BN γ
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
        return jnp.asarray(rng.uniform(-0.5, 0.5, s.shape), s.dtype)
    params = jax.tree_util.tree_map_with_path(draw, shapes)
    return model, params, model.unit_groups(params)


def resnet_policy(opts=None):
    model, params, groups = resnet_setup()
    return model, params, groups, policies.build_policy("scalefl", R_CAPS, opts or {},
                                                        unit_groups=groups)


def test_resnet_layout_depths_and_widths_against_a_hand_count():
    model, params, groups, pol = resnet_policy()
    n = sum(l.size for l in jax.tree_util.tree_leaves(params))
    assert n == R_N == resnet_held(4, (4, 8, 8, 8))
    flags = masks.maskable_flags(params)
    assert R_MASKABLE == resnet_held(4, (4, 8, 8, 8), maskable=True) == sum(
        l.size for l, f in zip(jax.tree_util.tree_leaves(params), flags) if f)
    layout = scalefl.exit_layout(groups)
    assert layout.blocks == (("stem", "stage1"), ("stage2",), ("stage3",), ("stage4",))
    assert layout.exits == ("exit1", "exit2", "exit3", "head")
    want = {0: (4, (4, 8, 8, 8), 7908), 1: (2, (3, 6), 1702), 2: (1, (3,), 455), 3: (1, (1,), 83)}
    for level, (d, k, held) in want.items():
        spec = spec_for(pol, params, level)
        assert int(spec["depth"]) == d
        np.testing.assert_array_equal(np.asarray(spec["exit_weights"]), np.arange(4) < d)
        kept = units.kept_sizes(groups, {n: np.asarray(v) for n, v in spec["units"].items()})
        for s in range(1, 5):   # the stream and both block-inner groups of every stage
            ks = k[s - 1] if s <= d else 0
            got = [kept[f"stream{s}"], kept[f"stage{s}.block1"], kept[f"stage{s}.block2"]]
            assert got == [ks] * 3, (level, s)
        m = pol.mask(params, spec)
        assert int(sum(float(v.sum()) for v in jax.tree_util.tree_leaves(m))) == held \
            == resnet_held(d, k)
        first_depth = {"stem": 1, "stage1": 1, "exit1": 1, "stage2": 2, "exit2": 2,
                       "stage3": 3, "exit3": 3, "stage4": 4, "head": 4}
        for name, deep in first_depth.items():   # whole modules held iff within the depth
            total = sum(float(v.sum()) for v in jax.tree_util.tree_leaves(m[name]))
            assert (total > 0) == (deep <= d), (level, name)
        # BN γ/β of kept channels are held (and count), those of dropped channels are not.
        np.testing.assert_array_equal(np.asarray(m["stem"]["bn"]["scale"]), np.arange(4) < k[0])


@pytest.mark.parametrize("a", [0.5, 0.25])
def test_resnet_widths_fill_the_budget_against_a_brute_force_search(a):
    _, params, groups, pol = resnet_policy({"depth_exponent": a})
    for level, r in enumerate(R_CAPS):
        d = max(1, math.ceil(round(r ** a * 4, 6)))
        counts = {}
        for w in np.linspace(1e-3, 1, 4001):
            k = tuple(max(1, math.ceil(round(w * c, 6))) for c in (4, 8, 8, 8)[:d])
            counts[k] = resnet_held(d, k, maskable=True)
        best = closest(counts, math.ceil(round(r * R_MASKABLE, 6)))
        spec = spec_for(pol, params, level)
        assert int(spec["depth"]) == d
        kept = units.kept_sizes(groups, {n: np.asarray(v) for n, v in spec["units"].items()})
        assert tuple(kept[f"stream{s + 1}"] for s in range(d)) == best, (a, level)
        m = pol.mask(params, spec)
        held = int(sum(float(v.sum()) for v in jax.tree_util.tree_leaves(m)))
        flags = masks.maskable_flags(params)
        held_maskable = int(sum(float(v.sum()) for v, f in zip(jax.tree_util.tree_leaves(m), flags)
                                if f))
        assert held == resnet_held(d, best) and held_maskable == counts[best]


@pytest.mark.parametrize("a", [0.5, 0.25])    # depths 4, 2, 1, 1 and 4, 3, 2, 2
def test_resnet_shrunk_depth_reduced_submodels_equal_the_masked_readout(a):
    model, params, groups, pol = resnet_policy({"depth_exponent": a})
    full = jax.jit(lambda p: model.apply({"params": p}, XR, exits=True))
    for level in range(len(R_CAPS)):
        spec = spec_for(pol, params, level)
        masked = pol.apply(params, spec)
        ref = np.asarray(pol.readout(full(masked), spec))
        small, shrunk = costs.shrunk_submodel(model, masked, spec, groups)
        d = int(spec["depth"])
        modules = (["stem", "head"] + [f"stage{s}" for s in range(1, d + 1)]
                   + [f"exit{s}" for s in range(1, d)])
        assert len(small.widths) == d and sorted(shrunk) == sorted(modules)
        assert sum(v.size for v in jax.tree_util.tree_leaves(shrunk)) == \
            int(sum(float(v.sum()) for v in jax.tree_util.tree_leaves(pol.mask(params, spec))))
        np.testing.assert_allclose(np.asarray(small.apply({"params": shrunk}, XR)), ref,
                                   rtol=1e-4, atol=1e-4, err_msg=f"level {level}")


def test_resnet_bad_setups_raise_clear_errors():
    model, params, groups = resnet_setup()
    plain = model.clone(early_exits=False)
    no_exits = {k: v for k, v in params.items() if not k.startswith("exit")}
    with pytest.raises(ValueError, match="ResNet-18 with early exits"):
        policies.build_policy("scalefl", R_CAPS, unit_groups=plain.unit_groups(no_exits))
    cfg = default_config.get_config()
    cfg.method = "scalefl"
    cfg.model = type(cfg.model)({"name": "resnet18", "widths": (4, 8), "early_exits": False})
    with pytest.raises(ConfigError, match=r"config\.model = 'resnet18 early_exits=False "
                                          r"widths=\(4, 8\)': .*or a ResNet-18 with early exits"):
        validate_config(cfg)
    cfg.model.early_exits = True
    validate_config(cfg)
    cfg.model.widths = (4,)
    with pytest.raises(ConfigError, match="at least 2 stages"):
        validate_config(cfg)
    cfg.model = type(cfg.model)({"name": "cnn"})
    with pytest.raises(ConfigError, match=r"config\.model = 'cnn early_exits=False'"):
        validate_config(cfg)


def test_one_scalefl_round_on_the_cifar_resnet_smoke_path(tmp_path):
    """configs/cifar_smoke.py with exits (TFDS mock data, on-device augmentation), shrunk
    to one block per stage: one round under the loop strategy, evaluation and costs."""
    pytest.importorskip("tensorflow_datasets")
    import cifar_smoke
    cfg = cifar_smoke.get_config("four,global,exits")
    cfg.method = "scalefl"
    cfg.model.widths, cfg.model.blocks_per_stage = (4, 8, 8, 8), (1, 1, 1, 1)
    cfg.data.mock_examples, cfg.data.n_train, cfg.data.n_test = 100, 10, 4
    cfg.num_rounds, cfg.clients_per_round, cfg.client.local_steps = 1, 4, 1
    cfg.client.batch_size, cfg.checkpoint_every = 5, 0
    cfg.engine.strategy = "loop"
    s = train.train_and_evaluate(cfg, str(tmp_path), progress=False)
    n = s["num_params"]

    def held(d, k, maskable=False):
        return resnet_held(d, k, num_classes=10, blocks=1, maskable=maskable)
    assert n == held(4, (4, 8, 8, 8))
    n_maskable = held(4, (4, 8, 8, 8), maskable=True)
    assert np.isfinite(s["final"]["train_loss"])
    a = cfg.scalefl.depth_exponent
    for r in cfg.capacities:
        c = s["costs"][evaluate.capacity_label(r)]
        assert c["flops_basis"] == "shrunk dense"
        d = max(1, math.ceil(round(r ** a * 4, 6)))
        sizes = (4, 8, 8, 8)[:d]     # the uniform width ratio closest to ⌈r·N⌉ (maskable)
        grid = {tuple(math.ceil(round(j / c_ * c2, 6)) for c2 in sizes)
                for c_ in sizes for j in range(1, c_ + 1)}
        best = closest({k: held(d, k, maskable=True) for k in grid},
                       math.ceil(round(r * n_maskable, 6)))
        assert c["params_held"] == held(d, best)
