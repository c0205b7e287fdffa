"""evaluate: every metric re-derived in NumPy on a model whose predictions we control."""
import jax.numpy as jnp
import numpy as np
import pytest

from fiarse_jax import masks, policies
from fiarse_jax.data import FederatedData, stack_clients
from fiarse_jax.evaluate import capacity_label, make_evaluator


def test_capacity_labels():
    assert [capacity_label(r) for r in (1.0, 0.25, 1 / 16, 1 / 64, 0.64, 1 / 3, 0.3333)] == \
        ["1", "1/4", "1/16", "1/64", "0.64", "1/3", "0.3333"]


@pytest.mark.parametrize("batch_size", [3, 1024])  # 3: several batches plus a padded last one
def test_metrics_match_numpy(batch_size):
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
    evaluate = make_evaluator(lambda p, xb, spec=None: xb @ p["Dense_0"]["kernel"], policy, caps,
                              assignment, batch_size=batch_size)
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
    logits = x @ kernel
    ce = -(logits[np.arange(len(y)), y] - np.log(np.exp(logits).sum(-1)))
    assert out["global_loss"] == pytest.approx(ce.mean(), rel=1e-5)
