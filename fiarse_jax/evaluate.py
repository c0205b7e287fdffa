"""Evaluation: the full model and every capacity's sub-model, on global and local tests.

For each capacity level r the sub-model ``policy.apply(params, spec_r)`` — the
model a client of that level computes with (x ⊙ 1[|x| ≥ θ_r] for FIARSE; a random
policy uses one fixed draw, key 0) — is scored on
* the *global* test set: every client's test samples pooled, and
* the *local* tests of that capacity's clients: pooled over their samples
  (``local_accuracy``) and as the mean of per-client accuracies
  (``local_accuracy_client_mean``, the paper's per-size local number).
So every cell of the paper's tables has a counterpart. The full (unmasked)
global model is scored on the global test set (``global_accuracy``). Test samples
go through the model in pooled batches of ``batch_size`` (the last one smaller):
a model with static BatchNorm (ResNet-18) normalises with those batches' statistics.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fiarse_jax.data.federated import FederatedData
from fiarse_jax.policies.base import MaskPolicy


def capacity_label(r: float) -> str:
    """'1', '1/4', '1/16' when 1/r is an integer (to 1e-9), else the decimal ('0.64')."""
    inv = 1.0 / r
    if abs(inv - round(inv)) < 1e-9 * inv:
        return "1" if round(inv) == 1 else f"1/{round(inv)}"
    return f"{r:.6g}"


def make_evaluator(logits_fn: Callable[..., jax.Array], policy: MaskPolicy,
                   capacities: Sequence[float], assignment: np.ndarray, *,
                   batch_size: int = 1024,
                   transform: Callable[[jax.Array], jax.Array] | None = None) -> Callable[..., dict]:
    """``evaluate(params, round_state, data) -> metrics dict`` (see module docstring).

    ``assignment[c]`` is the capacity level index of client ``c``;
    ``logits_fn(params, x, spec=None)`` (``spec`` picks a sub-model's readout head);
    ``transform(x)`` prepares stored test images (e.g. CIFAR normalisation).
    """
    labels = [capacity_label(r) for r in capacities]
    assignment = np.asarray(assignment)

    @jax.jit
    def score(params, x, y, spec):
        if transform is not None:
            x = transform(x)
        logits = logits_fn(params, x, spec)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return (jnp.argmax(logits, -1) == y), loss

    @jax.jit
    def extract(params, round_state, level):
        # The sub-model as a client of this level computes with it: x ⊙ 1[|x| ≥ θ] for
        # FIARSE; with HeteroFL's scaler on, the 1/r scale it was trained with (a norm
        # layer after it, as in ResNet-18, absorbs it; the MLP/CNN have none).
        spec = policy.client_spec(round_state, level, jax.random.PRNGKey(0))
        return policy.apply(params, spec), spec

    def predict(params, data: FederatedData, spec=None):
        # Batches of ``batch_size`` and a smaller last one (one more compiled shape, no
        # padding): with static BN a batch's statistics are part of the prediction, so
        # padded rows would change the real rows' outputs.
        n = data.test_y.shape[0]
        correct, losses = [], []
        for s in range(0, n, batch_size):
            c, l = score(params, data.test_x[s:s + batch_size], data.test_y[s:s + batch_size], spec)
            correct.append(np.asarray(c))
            losses.append(np.asarray(l))
        return np.concatenate(correct).astype(np.float64), np.concatenate(losses)

    def evaluate(params, round_state, data: FederatedData) -> dict:
        test_client = np.asarray(data.test_client)
        num_clients = len(assignment)
        sample_level = assignment[test_client]
        correct, loss = predict(params, data)
        out = {"global_accuracy": float(correct.mean()), "global_loss": float(loss.mean()),
               "local_accuracy": {}, "local_accuracy_client_mean": {},
               "capacity_global_accuracy": {}}
        for lvl, label in enumerate(labels):
            sub, spec = extract(params, round_state, jnp.asarray(lvl, jnp.int32))
            c, _ = predict(sub, data, spec)
            own = sample_level == lvl
            per_client_n = np.bincount(test_client[own], minlength=num_clients)
            per_client_c = np.bincount(test_client[own], weights=c[own], minlength=num_clients)
            has = per_client_n > 0
            out["capacity_global_accuracy"][label] = float(c.mean())
            out["local_accuracy"][label] = float(c[own].mean()) if own.any() else float("nan")
            out["local_accuracy_client_mean"][label] = (
                float((per_client_c[has] / per_client_n[has]).mean()) if has.any() else float("nan"))
        return out

    return evaluate
