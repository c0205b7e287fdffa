"""client + engine: local training against hand-built references; loop == vmap."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fiarse_jax import models, policies
from fiarse_jax.core import masks
from fiarse_jax.data import ClientData, stack_clients
from fiarse_jax.federated import engine
from fiarse_jax.federated.client import client_update, make_client_fns


def linear_loss(p, x, y, rng, spec=None):
    """mean_i (w · x_i): its gradient is the batch mean of x, so we can sum steps by hand."""
    del y, rng, spec
    return jnp.mean(x.reshape(x.shape[0], -1) @ p["Dense_0"]["kernel"][:, 0])


def test_batches_cycle_every_valid_row_and_never_read_padding():
    x = np.arange(1, 6, dtype=np.float32).reshape(5, 1)
    # Pad to 8 rows with NaN: reading one would poison the result.
    data = ClientData(jnp.asarray(np.concatenate([x, np.full((3, 1), np.nan, np.float32)])),
                      jnp.zeros(8, jnp.int32), jnp.asarray(5))
    params = {"Dense_0": {"kernel": jnp.zeros((1, 1))}}
    policy = policies.build_policy("fiarse", (1.0,), {"gradient": "masked"})
    fns = make_client_fns(linear_loss, policy, optax.sgd(0.1), num_steps=5, batch_size=2)
    state = fns.init(params, jnp.zeros(()), data, jax.random.PRNGKey(3))
    for k in range(5):
        state = fns.step(state, jnp.zeros(()), data, k)
    res = fns.final(params, state, jnp.zeros(()))
    # 10 draws over 5 rows = each row exactly twice: Σ_k mean(batch_k) = 2·Σx / 2 = Σx = 15.
    np.testing.assert_allclose(float(res.delta["Dense_0"]["kernel"][0, 0]), 0.1 * 15.0, rtol=1e-6)


@pytest.mark.parametrize("local_epochs", [0.0, 3.0])
def test_every_pass_over_a_clients_rows_is_a_fresh_permutation(local_epochs):
    """Batch size 1: step k's gradient is the row it read, so the walk is visible. Each
    pass over the 7 rows visits every row once, and the passes' orders differ."""
    x = np.arange(1, 8, dtype=np.float32).reshape(7, 1)
    data = ClientData(jnp.asarray(np.concatenate([x, np.full((2, 1), np.nan, np.float32)])),
                      jnp.zeros(9, jnp.int32), jnp.asarray(7))
    params = {"Dense_0": {"kernel": jnp.zeros((1, 1))}}
    policy = policies.build_policy("fiarse", (1.0,), {"gradient": "masked"})
    fns = make_client_fns(linear_loss, policy, optax.sgd(1.0), num_steps=21, batch_size=1,
                          local_epochs=local_epochs)
    state = fns.init(params, jnp.zeros(()), data, jax.random.PRNGKey(11))
    rows = []
    for k in range(21):
        before = float(state.params["Dense_0"]["kernel"][0, 0])
        state = fns.step(state, jnp.zeros(()), data, k)
        rows.append(round(before - float(state.params["Dense_0"]["kernel"][0, 0])) - 1)
    passes = [rows[i:i + 7] for i in range(0, 21, 7)]
    for p in passes:
        assert sorted(p) == list(range(7))
    assert len({tuple(p) for p in passes}) == 3


def test_one_step_masked_equals_reference_with_fixed_numpy_mask():
    model = models.build_model("mlp", 3, {"hidden_sizes": (6,)})
    rng = np.random.default_rng(0)
    xb = rng.normal(size=(4, 5)).astype(np.float32)
    yb = np.array([0, 1, 2, 1], np.int32)
    params = model.init(jax.random.PRNGKey(0), xb)["params"]

    def loss(p, x, y, key, spec=None):
        del key
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

    theta = masks.importance_threshold(params, 0.4)
    # Reference: the mask as a constant NumPy array, gradient by plain autodiff.
    np_mask = jax.tree_util.tree_map(lambda l: (np.abs(np.asarray(l)) >= float(theta)).astype(np.float32), params)
    g_ref = jax.grad(lambda p: loss(jax.tree_util.tree_map(jnp.multiply, p, np_mask), xb, yb, None))(params)

    policy = policies.build_policy("fiarse", (0.4,), {"gradient": "masked"})
    fns = make_client_fns(loss, policy, optax.sgd(0.1), num_steps=1, batch_size=4)
    data = ClientData(jnp.asarray(xb), jnp.asarray(yb), jnp.asarray(4))
    st = fns.step(fns.init(params, theta, data, jax.random.PRNGKey(1)), theta, data, 0)
    res = fns.final(params, st, theta)
    chex.assert_trees_all_close(res.delta, jax.tree_util.tree_map(lambda g: 0.1 * g, g_ref),
                                rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(res.mask, np_mask)


def test_mask_is_reevaluated_each_step_with_theta_fixed():
    """A weight pushed below θ by local training drops out and stops moving."""
    params = {"Dense_0": {"kernel": jnp.array([[1.0, 0.55]])}}

    def loss(p, x, y, key, spec=None):
        del x, y, key
        return jnp.sum(p["Dense_0"]["kernel"])  # gradient 1 on every kept weight

    policy = policies.build_policy("fiarse", (0.5,), {"gradient": "masked"})
    theta = jnp.asarray(0.5)
    fns = make_client_fns(loss, policy, optax.sgd(0.1), num_steps=3, batch_size=1)
    data = ClientData(jnp.zeros((1, 1)), jnp.zeros(1, jnp.int32), jnp.asarray(1))
    st = fns.init(params, theta, data, jax.random.PRNGKey(0))
    for k in range(3):
        st = fns.step(st, theta, data, k)
    res = fns.final(params, st, theta)
    # w0 = 1.0 stays above θ for 3 steps: moves 0.3. w1 = 0.55 → 0.45 < θ after step 1: moves 0.1.
    np.testing.assert_allclose(np.asarray(res.delta["Dense_0"]["kernel"]), [[0.3, 0.1]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(res.mask["Dense_0"]["kernel"]), [[1.0, 1.0]])


@pytest.mark.parametrize("gradient", ["tcb", "masked"])
def test_loop_and_vmap_strategies_agree(gradient):
    rng = np.random.default_rng(0)
    model = models.build_model("cnn", 4, {"features": (4, 6), "hidden_sizes": (8,)})
    sizes = [3, 25, 11, 40]  # unequal, some smaller than a batch
    x = rng.normal(size=(sum(sizes), 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 4, sum(sizes)).astype(np.int32)
    parts = np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1])
    data = stack_clients(x, y, parts)
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]

    def loss(p, xb, yb, key, spec=None):
        del key
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xb), yb).mean()

    caps = (1.0, 0.5, 0.25)
    policy = policies.build_policy("fiarse", caps, {"gradient": gradient})
    fns = make_client_fns(loss, policy, optax.sgd(0.1), num_steps=6, batch_size=10)
    state = policy.prepare(params, 0, jax.random.PRNGKey(0))
    keys = jax.random.split(jax.random.PRNGKey(7), 4)
    specs = jax.vmap(policy.client_spec, in_axes=(None, 0, 0))(state, jnp.array([0, 1, 2, 1]), keys)
    out_loop = engine.make_round_runner(fns, "loop")(params, specs, data, keys)
    out_vmap = engine.make_round_runner(fns, "vmap")(params, specs, data, keys)
    chex.assert_trees_all_close(out_loop, out_vmap, rtol=1e-4, atol=1e-5)
    # ... and with XLA's default options (on CPU: YNNPACK's convolutions, not Eigen's)
    out_default = engine.make_round_runner(fns, "loop", xla="default")(params, specs, data, keys)
    chex.assert_trees_all_close(out_loop, out_default, rtol=1e-4, atol=1e-5)
    # Training really happened, and dropped coordinates never moved.
    d = np.asarray(out_loop.delta["Dense_0"]["kernel"])
    m = np.asarray(out_loop.mask["Dense_0"]["kernel"])
    assert np.abs(d).max() > 0 and np.all(d[m == 0] == 0)


def test_strategy_resolution_and_unknown_strategy():
    with pytest.raises(ValueError, match="'pmap'"):
        engine.resolve_strategy("pmap")
    here = engine.resolve_strategy("auto")
    assert here == engine.resolve_strategy("auto", backend=jax.default_backend(),
                                           local_devices=jax.local_device_count(),
                                           processes=jax.process_count())
    # auto: sharded across processes or over several accelerator devices, vmap on one
    # accelerator, loop on CPU (however many host devices are forced)
    for backend, devices, processes, want in [
            ("cpu", 1, 1, "loop"), ("cpu", 8, 1, "loop"), ("cpu", 1, 2, "sharded"),
            ("gpu", 1, 1, "vmap"), ("gpu", 2, 1, "sharded"), ("tpu", 8, 1, "sharded"),
            ("tpu", 4, 4, "sharded")]:
        assert engine.resolve_strategy("auto", backend=backend, local_devices=devices,
                                       processes=processes) == want, (backend, devices)
    assert engine.resolve_strategy("vmap", backend="tpu", local_devices=8) == "vmap"


@pytest.mark.parametrize("method", ["fiarse", "heterofl"])
def test_adamw_leaves_coordinates_outside_the_submodel_exactly_unchanged(method):
    """AdamW (momentum + decoupled weight decay) moves every local weight; the client's
    delta must still be exactly 0 outside the sub-model it received, and inside it equal
    a plain optax loop on the same batches."""
    model = models.build_model("mlp", 3, {"hidden_sizes": (8,)})
    rng = np.random.default_rng(1)
    xb = rng.normal(size=(6, 5)).astype(np.float32)
    yb = rng.integers(0, 3, 6).astype(np.int32)
    params = model.init(jax.random.PRNGKey(2), xb)["params"]
    params = jax.tree_util.tree_map(lambda a: a + 0.1, params)   # no zero weights or biases

    def loss(p, x, y, key, spec=None):
        del key, spec
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

    policy = policies.build_policy(method, (0.25,), {"gradient": "masked"} if method == "fiarse"
                                   else {}, unit_groups=model.unit_groups(params))
    opt = optax.adamw(0.05, b1=0.9, b2=0.95, weight_decay=0.5)
    fns = make_client_fns(loss, policy, opt, num_steps=4, batch_size=6)
    spec = policy.client_spec(policy.prepare(params, 0, jax.random.PRNGKey(0)), 0,
                              jax.random.PRNGKey(0))
    data = ClientData(jnp.asarray(xb), jnp.asarray(yb), jnp.asarray(6))
    st = fns.init(params, spec, data, jax.random.PRNGKey(1))
    for k in range(4):
        st = fns.step(st, spec, data, k)
    res = fns.final(params, st, spec)

    # Reference: the same 4 full-batch AdamW steps by hand, nothing masked afterwards.
    p, s = params, opt.init(params)
    for _ in range(4):
        g = jax.grad(lambda q: loss(policy.apply(q, spec), xb, yb, None))(p)
        u, s = opt.update(g, s, p)
        p = optax.apply_updates(p, u)
    raw = jax.tree_util.tree_map(jnp.subtract, params, p)
    mask = [np.asarray(m) for m in jax.tree_util.tree_leaves(res.mask)]
    assert all(m.dtype == np.uint8 for m in mask)   # a quarter of a float32 mask's memory
    assert 0 < sum(m.sum() for m in mask) < sum(m.size for m in mask)
    for d, r, m in zip(jax.tree_util.tree_leaves(res.delta), jax.tree_util.tree_leaves(raw), mask):
        d, r = np.asarray(d), np.asarray(r)
        assert np.all(d[m == 0] == 0.0)                      # exactly, not approximately
        np.testing.assert_allclose(d[m > 0], r[m > 0], rtol=1e-5, atol=1e-7)
    # Without the rule the weight decay would have leaked: the reference moved them.
    assert any(np.abs(np.asarray(r)[m == 0]).max(initial=0) > 1e-4
               for r, m in zip(jax.tree_util.tree_leaves(raw), mask))


def test_local_epochs_give_each_client_its_own_step_count_under_every_strategy():
    """E = 2 epochs at batch 10: clients of 5, 13 and 40 rows take 1, 3 and 8 steps. Each
    equals that client trained alone for exactly its own K, and loop == vmap."""
    rng = np.random.default_rng(3)
    sizes = [5, 13, 40]
    model = models.build_model("mlp", 3, {"hidden_sizes": (6,)})
    x = rng.normal(size=(sum(sizes), 4)).astype(np.float32)
    y = rng.integers(0, 3, sum(sizes)).astype(np.int32)
    data = stack_clients(x, y, np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1]))
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]

    def loss(p, xb, yb, key, spec=None):
        del key, spec
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xb), yb).mean()

    policy = policies.build_policy("fiarse", (0.5,), {"gradient": "masked"})
    spec = policy.client_spec(policy.prepare(params, 0, None), 0)
    specs = jax.tree_util.tree_map(lambda a: jnp.stack([a] * 3), spec)
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    fns = make_client_fns(loss, policy, optax.sgd(0.1), num_steps=8, batch_size=10,
                          local_epochs=2.0)
    out = {s: engine.make_round_runner(fns, s)(params, specs, data, keys) for s in ("loop", "vmap")}
    chex.assert_trees_all_close(out["loop"], out["vmap"], rtol=1e-5, atol=1e-7)
    for i, own in enumerate([1, 3, 8]):
        alone = make_client_fns(loss, policy, optax.sgd(0.1), num_steps=own, batch_size=10)
        client = jax.tree_util.tree_map(lambda a: a[i], data)
        ref = client_update(alone, params, spec, client, keys[i])
        chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a[i], out["loop"]), ref,
                                    rtol=1e-5, atol=1e-7)
