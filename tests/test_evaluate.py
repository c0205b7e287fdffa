"""evaluate: every metric re-derived in NumPy on a model whose predictions we control."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fiarse_jax import policies
from fiarse_jax.core import masks
from fiarse_jax.data import FederatedData, stack_clients
from fiarse_jax.federated.evaluate import capacity_label, make_evaluator


def test_capacity_labels():
    assert [capacity_label(r) for r in (1.0, 0.25, 1 / 16, 1 / 64, 0.64, 1 / 3, 0.3333)] == \
        ["1", "1/4", "1/16", "1/64", "0.64", "1/3", "0.3333"]


# batch 3: several batches and smaller last ones; 7 samples per step: a step of one or two
# batches and a remainder (lax.map's) — the scores cannot depend on how they are grouped.
@pytest.mark.parametrize("batch_size,levels,samples_per_step",
                         [(3, "map", 1280), (3, "vmap", 1280), (3, "map", 7), (3, "vmap", 13),
                          (1024, "vmap", 1280)])
def test_metrics_match_numpy(batch_size, levels, samples_per_step):
    rng = np.random.default_rng(0)
    # Sample j is the one-hot e_{f_j}, so its logits are row f_j of the (masked) kernel.
    kernel = rng.normal(size=(5, 3)).astype(np.float32)
    params = {"Dense_0": {"kernel": kernel}}
    feats = np.array([0, 1, 2, 3, 4, 0, 2, 4, 1, 3, 3])
    x = np.eye(5, dtype=np.float32)[feats]
    y = rng.integers(0, 3, len(feats)).astype(np.int32)
    client = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3], np.int32)
    assignment = np.array([0, 0, 1, 1])          # clients 0, 1 → level 0; 2, 3 → level 1
    caps = (1.0, 0.4)
    data = FederatedData(train=stack_clients(x, y, [np.arange(2)] * 4), test_x=jnp.asarray(x),
                         test_y=jnp.asarray(y), test_client=jnp.asarray(client), num_classes=3,
                         train_sizes=np.full(4, 2), test_sizes=np.bincount(client))
    policy = policies.build_policy("fiarse", caps)
    honest = np.array([True, False, True, True])   # client 1 a (simulated) attacker
    evaluate = make_evaluator(lambda p, xb, spec=None: xb @ p["Dense_0"]["kernel"], policy, caps,
                              assignment, batch_size=batch_size, honest=honest, levels=levels,
                              samples_per_step=samples_per_step)
    out = evaluate(params, policy.prepare(params, 0, None), data)

    def np_correct(w):
        return (np.argmax(x @ w, -1) == y).astype(float)

    full = np_correct(kernel)
    assert out["global_accuracy"] == pytest.approx(full.mean())
    for lvl, r in enumerate(caps):
        label = capacity_label(r)
        m = np.abs(kernel) >= float(masks.importance_threshold(params, r))
        c = np_correct(kernel * m)
        own = assignment[client] == lvl
        per_client = [c[client == k].mean() for k in np.flatnonzero(assignment == lvl)]
        assert out["capacity_global_accuracy"][label] == pytest.approx(c.mean())
        assert out["local_accuracy"][label] == pytest.approx(c[own].mean())
        assert out["local_accuracy_client_mean"][label] == pytest.approx(np.mean(per_client))
        assert out["local_accuracy_honest"][label] == pytest.approx(c[own & honest[client]].mean())
    logits = x @ kernel
    ce = -(logits[np.arange(len(y)), y] - np.log(np.exp(logits).sum(-1)))
    assert out["global_loss"] == pytest.approx(ce.mean(), rel=1e-5)


def _batch_norm_logits(p, xb, spec=None):
    """A static-BN-like model: features normalised with the batch's own statistics."""
    z = (xb - xb.mean(0)) / (xb.std(0) + 1e-3)
    return z @ p["Dense_0"]["kernel"]


def _bn_data(seed, n_per_client=(7, 5, 9, 4), global_perm=None):
    rng = np.random.default_rng(seed)
    n = sum(n_per_client)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = rng.integers(0, 3, n).astype(np.int32)
    client = np.repeat(np.arange(len(n_per_client)), n_per_client).astype(np.int32)
    gx, gy = (x, y) if global_perm is None else (x[global_perm], y[global_perm])
    return FederatedData(train=stack_clients(x, y, [np.arange(2)] * len(n_per_client)),
                         test_x=jnp.asarray(x), test_y=jnp.asarray(y),
                         test_client=jnp.asarray(client), num_classes=3,
                         train_sizes=np.full(len(n_per_client), 2),
                         test_sizes=np.asarray(n_per_client), global_x=gx, global_y=gy)


def _np_bn_correct(x, y, kernel, batch):
    """1/0 per sample, scoring ``x`` in order in batches of ``batch`` (NumPy reference)."""
    out = []
    for s in range(0, len(y), batch):
        xb = x[s:s + batch]
        z = (xb - xb.mean(0)) / (xb.std(0) + 1e-3)
        out.append(np.argmax(z @ kernel, -1) == y[s:s + batch])
    return np.concatenate(out).astype(float)


@pytest.mark.parametrize("levels", ["map", "vmap"])
def test_static_bn_local_scores_one_client_per_batch_and_global_in_its_own_order(levels):
    """A client's local accuracy under a batch-statistics model depends on its own test
    samples only (batches never mix clients), in batches of ``batch_size``; the global
    set is scored in its own order. Both re-derived in NumPy, each level with its own
    FIARSE sub-model (the levels predict differently: a level mix-up shows)."""
    kernel = np.random.default_rng(5).normal(size=(4, 3)).astype(np.float32)
    params = {"Dense_0": {"kernel": kernel}}
    caps = (1.0, 0.25)
    assignment = np.array([0, 1, 0, 1])   # levels with unequal batch counts per length
    policy = policies.build_policy("fiarse", caps)
    evaluate = make_evaluator(_batch_norm_logits, policy, caps, assignment, batch_size=3,
                              levels=levels, samples_per_step=6)
    perm = np.random.default_rng(9).permutation(25)
    data = _bn_data(0, global_perm=perm)
    out = evaluate(params, policy.prepare(params, 0, None), data)
    x, y, client = np.asarray(data.test_x), np.asarray(data.test_y), np.asarray(data.test_client)
    subs = [kernel * (np.abs(kernel) >= float(masks.importance_threshold(params, r)))
            for r in caps]
    per_client = [[_np_bn_correct(x[client == c], y[client == c], k, 3) for c in range(4)]
                  for k in subs]
    assert any((a != b).any() for a, b in zip(*per_client))
    for lvl, (label, mine) in enumerate((("1", [0, 2]), ("1/4", [1, 3]))):
        assert out["local_accuracy_client_mean"][label] == pytest.approx(
            np.mean([per_client[lvl][c].mean() for c in mine]), abs=1e-12)
        assert out["local_accuracy"][label] == pytest.approx(
            np.concatenate([per_client[lvl][c] for c in mine]).mean(), abs=1e-12)
        assert out["capacity_global_accuracy"][label] == pytest.approx(
            _np_bn_correct(x[perm], y[perm], subs[lvl], 3).mean(), abs=1e-12)
    assert out["global_accuracy"] == pytest.approx(
        _np_bn_correct(x[perm], y[perm], kernel, 3).mean(), abs=1e-12)


def test_a_clients_local_score_ignores_other_clients_test_data():
    kernel = np.random.default_rng(5).normal(size=(4, 3)).astype(np.float32)
    params = {"Dense_0": {"kernel": kernel}}
    caps = (1.0, 0.5)
    assignment = np.array([0, 1, 1, 1])          # client 0 alone at level 0
    policy = policies.build_policy("fedavg_full", caps)
    evaluate = make_evaluator(_batch_norm_logits, policy, caps, assignment, batch_size=4)
    a = _bn_data(0)
    # Client 2's test samples changed (same count), everything else equal.
    x = np.asarray(a.test_x).copy()
    x[np.asarray(a.test_client) == 2] = np.random.default_rng(7).normal(size=(9, 4)) * 5
    b = a._replace(test_x=jnp.asarray(x))
    out_a = evaluate(params, policy.prepare(params, 0, None), a)
    out_b = evaluate(params, policy.prepare(params, 0, None), b)
    assert out_a["local_accuracy"]["1"] == out_b["local_accuracy"]["1"]


def test_global_score_does_not_depend_on_the_partition():
    """The same global test set held by clients in two different ways scores the same."""
    kernel = np.random.default_rng(5).normal(size=(4, 3)).astype(np.float32)
    params = {"Dense_0": {"kernel": kernel}}
    caps = (1.0, 0.5)
    policy = policies.build_policy("fedavg_full", caps)
    a = _bn_data(0)
    gx, gy = np.asarray(a.test_x), np.asarray(a.test_y)
    perm = np.random.default_rng(3).permutation(len(gy))    # clients hold other samples
    b = _bn_data(0, n_per_client=(3, 10, 6, 6))._replace(
        test_x=jnp.asarray(gx[perm]), test_y=jnp.asarray(gy[perm]), global_x=gx, global_y=gy)
    outs = [make_evaluator(_batch_norm_logits, policy, caps, np.array([0, 0, 1, 1]),
                           batch_size=4)(params, policy.prepare(params, 0, None), d)
            for d in (a, b)]
    assert outs[0]["global_accuracy"] == outs[1]["global_accuracy"]
    assert outs[0]["capacity_global_accuracy"] == outs[1]["capacity_global_accuracy"]


def _class_sorted_dataset():
    from fiarse_jax.data import Dataset
    rng = np.random.default_rng(0)
    # Test rows stored class by class (as an image folder): row i's feature is i, to find it.
    return Dataset(x=rng.normal(size=(200, 2)).astype(np.float32), y=np.repeat(np.arange(4), 50),
                   num_classes=4, test_x=np.stack([np.arange(40.0)] * 2, 1).astype(np.float32),
                   test_y=np.repeat(np.arange(4), 10).astype(np.int32))


def test_dataset_order_keeps_the_test_split_whole_and_in_order_for_the_global_set():
    from fiarse_jax.data import federate
    ds = _class_sorted_dataset()
    for seed in (0, 1):
        fd = federate(ds, num_clients=4, alpha=0.3, test_fraction=0.2, min_client_size=2,
                      seed=seed, partition="balanced_dirichlet", n_train=20, n_test=5,
                      global_order="dataset")
        np.testing.assert_array_equal(fd.global_test()[0], ds.test_x)
        np.testing.assert_array_equal(fd.global_test()[1], ds.test_y)


def test_clients_order_is_the_authors_concatenation_of_shuffled_client_splits():
    """The authors' server test set: client k's test indices (from the partition, shuffled
    once) concatenated for k = 0, 1, ...; re-derived here from the partition itself."""
    from fiarse_jax.data import federate
    from fiarse_jax.data.partition import balanced_dirichlet_partition
    ds = _class_sorted_dataset()
    shuffled = 0
    for seed in (0, 1, 2):
        fd = federate(ds, num_clients=4, alpha=0.3, test_fraction=0.2, min_client_size=2,
                      seed=seed, partition="balanced_dirichlet", n_train=20, n_test=10)
        _, parts = balanced_dirichlet_partition(ds.y, ds.test_y, 4, 0.3, n_train=20, n_test=10,
                                                rng=np.random.default_rng(seed))
        gx, gy = (np.asarray(a) for a in fd.global_test())
        rows = gx[:, 0].astype(int)            # which test row each global sample is
        owner = np.asarray(fd.test_client)
        np.testing.assert_array_equal(owner, np.repeat(np.arange(4), 10))   # client order
        for k, part in enumerate(parts):       # client k's block: its split, in one order
            np.testing.assert_array_equal(np.sort(rows[owner == k]), np.sort(part))
            shuffled += not np.array_equal(rows[owner == k], np.sort(part))
        np.testing.assert_array_equal(gy, ds.test_y[rows])
        np.testing.assert_array_equal(gx, np.asarray(fd.test_x))   # the local arrays themselves
        # The same set as the dataset order, in another order.
        other = federate(ds, num_clients=4, alpha=0.3, test_fraction=0.2, min_client_size=2,
                         seed=seed, partition="balanced_dirichlet", n_train=20, n_test=10,
                         global_order="dataset")
        np.testing.assert_array_equal(np.sort(other.global_test()[0][:, 0]), np.sort(rows))
    assert shuffled > 6        # splits are not left in the stored (class-sorted) order
    with pytest.raises(ValueError, match="^eval.global_order = 'random': must be one of"):
        federate(ds, num_clients=4, alpha=0.3, test_fraction=0.2, min_client_size=2, seed=0,
                 partition="balanced_dirichlet", n_train=20, n_test=5, global_order="random")


def test_clients_order_global_batches_are_the_local_batches_under_static_bn():
    """With the authors' global set and a batch size dividing every client's test count,
    every global batch is one local batch: a full model's global accuracy is the pooled
    local accuracy, batch statistics included; the dataset's order scores other batches."""
    from fiarse_jax.data import Dataset, federate
    rng = np.random.default_rng(3)
    ds = Dataset(x=rng.normal(size=(400, 4)).astype(np.float32),
                 y=np.repeat(np.arange(4), 100).astype(np.int32), num_classes=4,
                 test_x=rng.normal(size=(80, 4)).astype(np.float32) + np.repeat(
                     np.eye(4, dtype=np.float32), 20, 0),
                 test_y=np.repeat(np.arange(4), 20).astype(np.int32))
    params = {"Dense_0": {"kernel": rng.normal(size=(4, 4)).astype(np.float32)}}
    policy = policies.build_policy("fedavg_full", (1.0,))
    out = {}
    for order in ("clients", "dataset"):
        fd = federate(ds, num_clients=4, alpha=0.3, test_fraction=0.2, min_client_size=2, seed=0,
                      partition="balanced_dirichlet", n_train=50, n_test=20, global_order=order)
        out[order] = make_evaluator(_batch_norm_logits, policy, (1.0,), np.zeros(4, int),
                                    batch_size=5)(params, policy.prepare(params, 0, None), fd)
    c = out["clients"]
    assert c["global_accuracy"] == pytest.approx(c["local_accuracy"]["1"])
    assert c["capacity_global_accuracy"]["1"] == pytest.approx(c["local_accuracy"]["1"])
    assert out["dataset"]["local_accuracy"] == c["local_accuracy"]
    assert out["dataset"]["global_accuracy"] != pytest.approx(c["global_accuracy"])


def test_levels_auto_is_map_on_cpu_and_vmap_elsewhere_and_a_bad_mode_is_one_line(tmp_path):
    import os
    import sys

    from fiarse_jax.experiment import train
    from fiarse_jax.experiment.config import ConfigError
    from fiarse_jax.federated.evaluate import resolve_levels
    assert [resolve_levels("auto", b) for b in ("cpu", "gpu", "tpu")] == ["map", "vmap", "vmap"]
    assert resolve_levels("vmap", "cpu") == "vmap"
    with pytest.raises(ValueError, match=r"^eval.levels = 'both': must be one of"):
        make_evaluator(_batch_norm_logits, policies.build_policy("fedavg_full", (1.0,)),
                       (1.0,), np.zeros(4, int), levels="both")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
    import default  # noqa: PLC0415
    c = default.get_config()
    c.eval.levels = "both"
    with pytest.raises(ConfigError) as err:
        train.train_and_evaluate(c, str(tmp_path / "run"))
    assert str(err.value).startswith("config.eval.levels = 'both': must be one of")
    assert not (tmp_path / "run").exists()


def _reference(run, params) -> dict:
    """The evaluation re-derived batch by batch: per level its sub-model, each batch alone."""
    state = run.eval_state(params, 1)
    gx, gy = (np.asarray(a) for a in run.data.global_test())
    lx, ly = np.asarray(run.data.test_x), np.asarray(run.data.test_y)
    owner = np.asarray(run.data.test_client)
    b = run.options.eval.batch_size
    logits = jax.jit(run.logits_fn)

    def correct(p, spec, x, y):
        return np.concatenate([np.argmax(logits(p, x[s:s + b], spec), -1) == y[s:s + b]
                               for s in range(0, len(y), b)])

    out = {"global_accuracy": correct(params, None, gx, gy).mean(),
           "global_loss": np.mean([optax.softmax_cross_entropy_with_integer_labels(
               logits(params, gx[s:s + b], None), gy[s:s + b]) for s in range(0, len(gy), b)]),
           "capacity_global_accuracy": {}, "local_accuracy_client_mean": {},
           "local_accuracy": {}}
    for lvl, r in enumerate(run.capacities):
        spec = run.policy.client_spec(state, lvl, run.eval_key)
        sub = run.policy.apply(params, spec)
        label = capacity_label(r)
        out["capacity_global_accuracy"][label] = correct(sub, spec, gx, gy).mean()
        own = [correct(sub, spec, lx[owner == c], ly[owner == c])
               for c in np.flatnonzero(run.assignment == lvl) if (owner == c).any()]
        out["local_accuracy_client_mean"][label] = np.mean([o.mean() for o in own])
        out["local_accuracy"][label] = np.concatenate(own).mean()
    return out


@pytest.mark.parametrize("method", ["fed_dropout", "heterofl", "scalefl"])
def test_both_level_modes_equal_a_batch_by_batch_reference(method):
    """A random draw (fed_dropout), width scaling (heterofl) and early-exit readouts
    (scalefl): the levels side by side and one after another score as the reference."""
    import os
    import sys

    from helpers import override

    from fiarse_jax.experiment import build
    from fiarse_jax.federated.evaluate import run_evaluator
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
    import default  # noqa: PLC0415
    # Batches of one (a single batch length: one compile here and in the reference).
    c = override(default.get_config(), method=method, **{"data.num_clients": 12,
                                                         "eval.batch_size": 1})
    if method == "scalefl":
        c.model.hidden_sizes, c.model.early_exits = (16, 16), True
    run = build.build_run(c)
    params = run.init_params
    want = _reference(run, params)
    for mode in ("map", "vmap"):
        c.eval.levels = mode
        got = run_evaluator(run)(params, 1)
        assert got["global_accuracy"] == pytest.approx(want["global_accuracy"], abs=1e-12)
        assert got["global_loss"] == pytest.approx(want["global_loss"], rel=1e-5)
        for k in ("capacity_global_accuracy", "local_accuracy_client_mean", "local_accuracy"):
            assert got[k] == pytest.approx(want[k], abs=1e-12), (mode, k)
