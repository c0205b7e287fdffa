"""Evaluation: the full model and every capacity's sub-model, on global and local tests.

For each capacity level r the sub-model ``policy.apply(params, spec_r)`` — the
model a client of that level computes with (x ⊙ 1[|x| ≥ θ_r] for FIARSE; a random
policy uses one fixed draw, the run's evaluation key) — is scored on
* the *global* test set (``FederatedData.global_test``: the dataset's test split in
  its own order when it has one), and
* the *local* tests of that capacity's clients: pooled over their samples
  (``local_accuracy``) and as the mean of per-client accuracies
  (``local_accuracy_client_mean``, the paper's per-size local number); with simulated
  attackers, also pooled over the honest clients only (``local_accuracy_honest``: an
  excluded attacker's own test split says nothing about the defence).
So every cell of the paper's tables has a counterpart. The full (unmasked)
global model is scored on the global test set (``global_accuracy``).

Batches are those of the authors' evaluation (their loaders never shuffle): the
global test set in its own order in batches of ``batch_size`` (their client batch
size, 20), and each client's own test split alone, in batches of ``batch_size`` —
a batch never mixes clients. With static BatchNorm (ResNet-18) a batch's statistics
are part of the prediction, so this is what "local" and "global" mean. Batches of one
length run as one vmapped call over the batch axis (each batch normalised on its
own, as if scored one by one); a smaller last batch is a length of its own, never
padded with rows (they would change the real rows' statistics). Calls are padded instead
with whole repeated batches up to ``max_batches`` (their results dropped), so each batch
length compiles once.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fiarse_jax import engine
from fiarse_jax.data.types import FederatedData
from fiarse_jax.policies.base import MaskPolicy


def capacity_label(r: float) -> str:
    """'1', '1/4', '1/16' when 1/r is an integer (to 1e-9), else the decimal ('0.64')."""
    inv = 1.0 / r
    if abs(inv - round(inv)) < 1e-9 * inv:
        return "1" if round(inv) == 1 else f"1/{round(inv)}"
    return f"{r:.6g}"


def batch_plan(groups: Sequence[np.ndarray], batch_size: int) -> dict[int, np.ndarray]:
    """Batches of every group of sample indices, each group cut in order into batches of
    ``batch_size`` (its last one smaller), never mixing groups: ``{length: [n, length]}``."""
    by_len: dict[int, list[np.ndarray]] = {}
    for g in groups:
        for s in range(0, len(g), batch_size):
            b = np.asarray(g[s:s + batch_size])
            by_len.setdefault(len(b), []).append(b)
    return {n: np.stack(bs) for n, bs in sorted(by_len.items())}


def make_evaluator(logits_fn: Callable[..., jax.Array], policy: MaskPolicy,
                   capacities: Sequence[float], assignment: np.ndarray, *,
                   batch_size: int = 20, key: jax.Array | None = None,
                   transform: Callable[[jax.Array], jax.Array] | None = None,
                   max_batches: int | None = None,
                   honest: np.ndarray | None = None,
                   xla: str = "auto") -> Callable[..., dict]:
    """``evaluate(params, round_state, data) -> metrics dict`` (see module docstring).

    ``assignment[c]`` is the capacity level index of client ``c``;
    ``logits_fn(params, x, spec=None)`` (``spec`` picks a sub-model's readout head);
    ``batch_size``: the evaluation batch (the authors': the client batch size);
    ``key``: the draw of a random policy's sub-model (default ``PRNGKey(0)``);
    ``transform(x)`` prepares stored test images (e.g. CIFAR normalisation);
    ``max_batches``: batches scored per device call (default: ⌈1,280 / batch_size⌉ samples'
    worth, which bounds evaluation memory);
    ``honest``: bool per client; when given, also ``local_accuracy_honest`` (pooled over the
    local tests of the capacity's honest clients only);
    ``xla``: the programs compile with ``engine.compiler_options(xla)``.
    """
    honest = None if honest is None else np.asarray(honest, bool)
    max_batches = max_batches or max(1, -(-1280 // batch_size))
    labels = [capacity_label(r) for r in capacities]
    assignment = np.asarray(assignment)
    key = jax.random.PRNGKey(0) if key is None else key

    options = engine.compiler_options(xla)

    @functools.partial(engine.jit, options=options)
    def score(params, x, y, spec):   # x: [batches, length, ...]: each batch on its own
        def one(xb, yb):
            if transform is not None:
                xb = transform(xb)
            logits = logits_fn(params, xb, spec)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), yb)
            return jnp.argmax(logits, -1) == yb, loss
        return jax.vmap(one)(x, y)

    @functools.partial(engine.jit, options=options)
    def extract(params, round_state, level):
        # The sub-model as a client of this level computes with it: x ⊙ 1[|x| ≥ θ] for
        # FIARSE; with HeteroFL's scaler on, the 1/r scale it was trained with (a norm
        # layer after it, as in ResNet-18, absorbs it; the MLP/CNN have none).
        spec = policy.client_spec(round_state, level, key)
        return policy.apply(params, spec), spec

    plans: dict[int, tuple] = {}   # id(data) -> (data, global plan, local plan)

    def plan(data: FederatedData):
        if id(data) not in plans or plans[id(data)][0] is not data:
            gx, gy = data.global_test()
            owner = np.asarray(data.test_client)
            local_groups = [np.flatnonzero(owner == c) for c in np.unique(owner)]
            plans.clear()   # host copies once per dataset, not per call
            plans[id(data)] = (data, (np.asarray(gx), np.asarray(gy),
                                      batch_plan([np.arange(len(gy))], batch_size)),
                               (np.asarray(data.test_x), np.asarray(data.test_y),
                                batch_plan(local_groups, batch_size)))
        return plans[id(data)][1:]

    def predict(params, x, y, batches, spec=None) -> tuple[np.ndarray, np.ndarray]:
        """(1/0, cross-entropy) per sample of ``x``, scored in the planned batches (samples
        in no batch: 0)."""
        correct, losses = np.zeros(len(y), np.float64), np.zeros(len(y), np.float64)
        for idx in batches.values():
            for s in range(0, len(idx), max_batches):
                part = idx[s:s + max_batches]
                # Whole batches repeated up to max_batches: one compiled shape per length.
                padded = np.concatenate([part, np.resize(part, (max_batches - len(part),
                                                                part.shape[1]))])
                c, l = score(params, x[padded], y[padded], spec)
                correct[part] = np.asarray(c)[:len(part)]
                losses[part] = np.asarray(l)[:len(part)]
        return correct, losses

    def evaluate(params, round_state, data: FederatedData) -> dict:
        (gx, gy, g_batches), (lx, ly, l_batches) = plan(data)
        test_client = np.asarray(data.test_client)
        num_clients = len(assignment)
        sample_level = assignment[test_client]
        correct, loss = predict(params, gx, gy, g_batches)
        out = {"global_accuracy": float(correct.mean()), "global_loss": float(loss.mean()),
               "local_accuracy": {}, "local_accuracy_client_mean": {},
               "capacity_global_accuracy": {}}
        if honest is not None:
            out["local_accuracy_honest"] = {}
        for lvl, label in enumerate(labels):
            sub, spec = extract(params, round_state, jnp.asarray(lvl, jnp.int32))
            own = sample_level == lvl
            out["capacity_global_accuracy"][label] = float(
                predict(sub, gx, gy, g_batches, spec)[0].mean())
            c, _ = predict(sub, lx, ly, {n: b[own[b[:, 0]]] for n, b in l_batches.items()}, spec)
            per_client_n = np.bincount(test_client[own], minlength=num_clients)
            per_client_c = np.bincount(test_client[own], weights=c[own], minlength=num_clients)
            has = per_client_n > 0
            out["local_accuracy"][label] = float(c[own].mean()) if own.any() else float("nan")
            if honest is not None:
                mine = own & honest[test_client]
                out["local_accuracy_honest"][label] = (float(c[mine].mean()) if mine.any()
                                                       else float("nan"))
            out["local_accuracy_client_mean"][label] = (
                float((per_client_c[has] / per_client_n[has]).mean()) if has.any() else float("nan"))
        return out

    return evaluate


def eval_batch_size(config) -> int:
    """``eval.batch_size``, or ``client.batch_size`` when 0 or absent (the authors score
    every test set in batches of their client batch size)."""
    b = config.get("eval", {}).get("batch_size", 0)
    return int(b) if b else int(config.client.batch_size)


def run_evaluator(run) -> Callable[[object, int], dict]:
    """``(params, rounds_done) -> metrics`` of a ``build.Run``: every capacity's sub-model
    on the global test set and on its clients' local tests (``make_evaluator``), with the
    policy's round state of the last trained round (``Run.eval_state``)."""
    evaluator = make_evaluator(run.logits_fn, run.policy, run.capacities, run.assignment,
                               batch_size=eval_batch_size(run.config), key=run.eval_key,
                               transform=run.eval_transform,
                               honest=~run.attackers if run.attackers.any() else None,
                               xla=run.config.engine.get("xla", "auto"))

    def evaluate_run(params, rounds_done: int) -> dict:
        view = engine.local_view(params)
        return evaluator(view, run.eval_state(view, rounds_done), run.data)

    return evaluate_run
