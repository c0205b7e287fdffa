"""Evaluation: the full model and every capacity's sub-model, on global and local tests.

For each capacity level r the sub-model ``policy.apply(params, spec_r)`` — the
model a client of that level computes with (x ⊙ 1[|x| ≥ θ_r] for FIARSE; a random
policy uses one fixed draw, the run's evaluation key) — is scored on
* the *global* test set (``FederatedData.global_test``: by default the authors' —
  every client's test split concatenated in client order; ``eval.global_order``), and
* the *local* tests of that capacity's clients: pooled over their samples
  (``local_accuracy``) and as the mean of per-client accuracies
  (``local_accuracy_client_mean``, the paper's per-size local number); with simulated
  attackers, also pooled over the honest clients only (``local_accuracy_honest``: an
  excluded attacker's own test split says nothing about the defence).
So every cell of the paper's tables has a counterpart. The full (unmasked)
global model is scored on the global test set (``global_accuracy``).

Batches are those of the authors' evaluation (their loaders never shuffle): the
global test set in its order in batches of ``batch_size`` (their client batch
size, 20), and each client's own test split alone, in batches of ``batch_size`` —
a batch never mixes clients. With static BatchNorm (ResNet-18) a batch's statistics
are part of the prediction, so this is what "local" and "global" mean. A smaller last
batch is a length of its own, never padded with rows (they would change the real rows'
statistics).

One evaluation is one compiled program and one host sync: the test batches stay on the
device between evaluations; the program extracts every level's sub-model once, runs its
batches with ``lax.map`` in steps of about ``samples_per_step`` samples (each batch on its
own), and scores the levels side by side (``levels="vmap"``: the sub-models stacked) or
one after another (``"map"``). Local batches are grouped by their client's level; a level
with fewer batches than another repeats some, whose results are dropped.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from fiarse_jax.core.capacities import capacity_label
from fiarse_jax.data.types import FederatedData
from fiarse_jax.federated import devices
from fiarse_jax.federated import xla as xla_lib
from fiarse_jax.policies.base import MaskPolicy


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """The evaluation (``config.eval``).

    Attributes:
      batch_size: test rows per batch (``config.eval.batch_size``, or the clients' batch
        size where that is 0: the authors score every test set in batches of it).
      levels: ``auto``, ``vmap`` (the capacity levels' sub-models side by side) or ``map``
        (one after another): ``resolve_levels``.
    """

    batch_size: int = 20
    levels: str = "auto"


def batch_plan(groups: Sequence[np.ndarray], batch_size: int) -> dict[int, np.ndarray]:
    """Batches of every group of sample indices, each group cut in order into batches of
    ``batch_size`` (its last one smaller), never mixing groups: ``{length: [n, length]}``."""
    by_len: dict[int, list[np.ndarray]] = {}
    for g in groups:
        for s in range(0, len(g), batch_size):
            b = np.asarray(g[s:s + batch_size])
            by_len.setdefault(len(b), []).append(b)
    return {n: np.stack(bs) for n, bs in sorted(by_len.items())}


LEVEL_MODES = ("auto", "vmap", "map")


def resolve_levels(mode: str, backend: str | None = None) -> str:
    """How the capacity levels' sub-models are scored in one program: ``"vmap"`` (stacked,
    side by side) or ``"map"`` (one after another, ``lax.map``); ``"auto"``: ``"map"`` on
    CPU (measured faster there: ``benchmarks/rounds.py --eval-levels map,vmap``), ``"vmap"``
    elsewhere. ``"vmap"`` holds every level's sub-model at once (levels × the model's
    memory): ``"map"`` is the choice for a large model on a small device.
    An unknown ``mode`` is a ``ValueError`` naming it (one line)."""
    if mode not in LEVEL_MODES:
        raise ValueError(f"eval.levels = {mode!r}: must be one of {LEVEL_MODES}")
    if mode != "auto":
        return mode
    backend = jax.default_backend() if backend is None else backend
    return "map" if backend == "cpu" else "vmap"


def batch_steps(index: np.ndarray, x: np.ndarray, y: np.ndarray, spare: np.ndarray,
                samples_per_step: int, side_by_side: int = 1) -> tuple:
    """Batches ``index`` [n, length] (-1: none) as arrays [steps, step, length, ...] in steps
    of about ``samples_per_step`` samples (over ``side_by_side`` sub-models run at once), the
    last step filled with repeats (of ``spare``'s batches where ``index`` has none); returns
    (x, y, index), the index padded with -1 (the repeats' results are dropped)."""
    step = max(1, min(len(index), samples_per_step // (index.shape[1] * side_by_side)))
    total = -(-len(index) // step) * step
    real = index[index[:, 0] >= 0]
    take = np.resize(real if len(real) else spare, (total, index.shape[1]))
    index = np.concatenate([index, np.full((total - len(index), index.shape[1]), -1)])
    shape = (total // step, step, index.shape[1])
    return x[take].reshape(shape + x.shape[1:]), y[take].reshape(shape), index.reshape(shape)


def evaluation_plan(data: FederatedData, assignment: np.ndarray, num_levels: int, *,
                    batch_size: int, samples_per_step: int, side_by_side: int = 1
                    ) -> tuple[dict, dict]:
    """The test batches of one evaluation, in NumPy: global ``{length: (x, y, index)}``
    (``batch_steps`` of the global test set cut in order); local the same with a leading
    level axis — each client's test split cut alone, grouped by its client's level, each
    level's batches padded to the longest level's count."""
    gx, gy = (np.asarray(a) for a in data.global_test())
    lx, ly = np.asarray(data.test_x), np.asarray(data.test_y)
    owner = np.asarray(data.test_client)
    glob = {n: batch_steps(b, gx, gy, b, samples_per_step, side_by_side)
            for n, b in batch_plan([np.arange(len(gy))], batch_size).items()}
    local = {}
    for n, b in batch_plan([np.flatnonzero(owner == c) for c in np.unique(owner)],
                           batch_size).items():
        level_of = assignment[owner[b[:, 0]]]
        most = np.bincount(level_of, minlength=num_levels).max()
        per = []
        for lvl in range(num_levels):
            mine = b[level_of == lvl]
            padded = np.concatenate([mine, np.full((most - len(mine), n), -1)])
            per.append(batch_steps(padded, lx, ly, b, samples_per_step, side_by_side))
        local[n] = tuple(np.stack(a) for a in zip(*per))
    return glob, local


def evaluation_metrics(scores: tuple[dict, dict], glob_index: dict, local_index: dict,
                       data: FederatedData, assignment: np.ndarray, labels: Sequence[str],
                       honest: np.ndarray | None = None) -> dict:
    """The metrics dict from the scorer's host results: ``scores`` = (per global length the
    full model's (correct, loss) and every level's correct; per local length every level's
    correct), placed back on their samples by the plan's indices (-1: a repeat, dropped)."""
    g, l = scores
    test_client = np.asarray(data.test_client)
    sample_level = np.asarray(assignment)[test_client]
    n_global = len(data.global_test()[1])
    correct, loss = np.zeros(n_global), np.zeros(n_global)
    level_global = np.zeros((len(labels), n_global))
    for n, idx in glob_index.items():
        real = idx >= 0
        correct[idx[real]], loss[idx[real]] = g[n][0][real], g[n][1][real]
        level_global[:, idx[real]] = g[n][2][:, real]
    c = np.zeros(len(test_client))   # 1/0 per local test sample, by its client's level
    for n, idx in local_index.items():
        real = idx >= 0
        c[idx[real]] = l[n][real]
    out = {"global_accuracy": float(correct.mean()), "global_loss": float(loss.mean()),
           "local_accuracy": {}, "local_accuracy_client_mean": {},
           "capacity_global_accuracy": {}}
    if honest is not None:
        out["local_accuracy_honest"] = {}
    num_clients = len(assignment)
    for lvl, label in enumerate(labels):
        own = sample_level == lvl
        out["capacity_global_accuracy"][label] = float(level_global[lvl].mean())
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


def make_scorer(logits_fn: Callable[..., jax.Array], policy: MaskPolicy, num_levels: int, *,
                key: jax.Array, transform: Callable[[jax.Array], jax.Array] | None = None,
                mode: str = "map", options: dict | None = None) -> Callable:
    """The jitted ``score(params, round_state, glob, local)``: ``glob`` {length: (x, y)}
    batches [steps, step, length, ...], ``local`` the same with a leading level axis. Per
    global length the full model's (correct, loss) and every level's correct [levels, ...];
    per local length every level's correct on its own batches. Each level's sub-model is
    extracted once (as a client of that level computes with it: x ⊙ 1[|x| ≥ θ] for FIARSE;
    with HeteroFL's scaler on, the 1/r scale it was trained with); each batch is normalised
    on its own; the levels run side by side (``mode="vmap"``) or one after another."""
    def one(params, spec, xb, yb):   # one batch, normalised on its own
        if transform is not None:
            xb = transform(xb)
        logits = logits_fn(params, xb, spec)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), yb)
        return jnp.argmax(logits, -1) == yb, loss

    def batches(params, spec, x, y):
        """x: [steps, step, length, ...] -> (correct, loss) [steps, step, length]."""
        run = jax.vmap(functools.partial(one, params, spec))
        if len(x) == 1:   # one step: no loop
            return jax.tree.map(lambda a: a[None], run(x[0], y[0]))
        return lax.map(lambda b: run(*b), (x, y))

    @functools.partial(xla_lib.jit, options=options or {})
    def score(params, round_state, glob, local):
        def level(lvl, own):
            spec = policy.client_spec(round_state, lvl, key)
            sub = policy.apply(params, spec)
            return ({n: batches(sub, spec, x, y)[0] for n, (x, y) in glob.items()},
                    {n: batches(sub, spec, x, y)[0] for n, (x, y) in own.items()})
        ids = jnp.arange(num_levels, dtype=jnp.int32)
        if mode == "vmap":
            levels_g, levels_l = jax.vmap(level)(ids, local)
        else:
            levels_g, levels_l = lax.map(lambda a: level(*a), (ids, local))
        return ({n: (*batches(params, None, x, y), levels_g[n]) for n, (x, y) in glob.items()},
                levels_l)

    return score


def make_evaluator(logits_fn: Callable[..., jax.Array], policy: MaskPolicy,
                   capacities: Sequence[float], assignment: np.ndarray, *,
                   batch_size: int = 20, key: jax.Array | None = None,
                   transform: Callable[[jax.Array], jax.Array] | None = None,
                   samples_per_step: int = 1280,
                   honest: np.ndarray | None = None,
                   xla: str = "auto", levels: str = "auto") -> Callable[..., dict]:
    """``evaluate(params, round_state, data) -> metrics dict`` (see module docstring): the
    batches planned once per dataset in NumPy (``evaluation_plan``) and kept on the device,
    one jitted program and one host sync per evaluation (``make_scorer``), the metrics on
    the host (``evaluation_metrics``).

    Args:
      logits_fn: ``(params, x, spec=None) -> logits`` (``spec`` picks a sub-model's
        readout head).
      policy: the method's ``MaskPolicy`` (its ``apply`` gives each level's sub-model).
      capacities: the capacity levels r.
      assignment: ``assignment[c]``, the capacity level index of client ``c``.
      batch_size: the evaluation batch (the authors': the client batch size).
      key: the draw of a random policy's sub-model (default ``PRNGKey(0)``).
      transform: ``transform(x)`` prepares stored test images (e.g. CIFAR normalisation).
      samples_per_step: about how many test samples one step of the program scores (over
        the levels side by side with ``"vmap"``; at least one batch per level), which
        bounds the activations' memory.
      honest: bool per client; when given, also ``local_accuracy_honest`` (pooled over
        the local tests of the capacity's honest clients only).
      xla: the programs compile with ``xla_lib.compiler_options(xla)``.
      levels: ``resolve_levels``' mode (``"auto"`` resolved here, on JAX's backend).

    Returns:
      ``evaluate(params, round_state, data) -> dict`` of the full model's and every
      capacity's accuracies and losses (module docstring).
    """
    honest = None if honest is None else np.asarray(honest, bool)
    mode = resolve_levels(levels)
    labels = [capacity_label(r) for r in capacities]
    assignment = np.asarray(assignment)
    score = make_scorer(logits_fn, policy, len(labels),
                        key=jax.random.PRNGKey(0) if key is None else key,
                        transform=transform, mode=mode, options=xla_lib.compiler_options(xla))
    plans: dict[int, tuple] = {}   # id(data) -> (data, global plan, local plan), one dataset

    def plan(data: FederatedData):
        if id(data) not in plans or plans[id(data)][0] is not data:
            glob, local = evaluation_plan(
                data, assignment, len(labels), batch_size=batch_size,
                samples_per_step=samples_per_step,
                side_by_side=len(labels) if mode == "vmap" else 1)
            # The test batches on the device (host arrays: no compiled ops), once per dataset.
            glob, local = ({n: (*jax.device_put((x, y)), i) for n, (x, y, i) in d.items()}
                           for d in (glob, local))
            plans.clear()
            plans[id(data)] = (data, glob, local)
        return plans[id(data)][1:]

    def evaluate(params, round_state, data: FederatedData) -> dict:
        glob, local = plan(data)
        scores = jax.device_get(score(params, round_state,
                                      {n: (x, y) for n, (x, y, _) in glob.items()},
                                      {n: (x, y) for n, (x, y, _) in local.items()}))
        return evaluation_metrics(scores, {n: i for n, (_, _, i) in glob.items()},
                                  {n: i for n, (_, _, i) in local.items()}, data, assignment,
                                  labels, honest)

    return evaluate


def _one_copy(tree):
    """One device's copy of each replicated multi-device leaf (the ``sharded`` strategy's
    parameters): the evaluation runs on one device, its test batches stay where they are."""
    def one(a):
        if (isinstance(a, jax.Array) and len(a.sharding.device_set) > 1
                and a.is_fully_replicated):
            return a.addressable_data(0)
        return a
    return jax.tree_util.tree_map(one, tree)


def run_evaluator(run) -> Callable[[object, int], dict]:
    """``(params, rounds_done) -> metrics`` of a ``run.Run``: every capacity's sub-model
    on the global test set and on its clients' local tests (``make_evaluator``), with the
    policy's round state of the last trained round (``Run.eval_state``)."""
    evaluator = make_evaluator(run.logits_fn, run.policy, run.capacities, run.assignment,
                               batch_size=run.options.eval.batch_size, key=run.eval_key,
                               transform=run.eval_transform,
                               honest=~run.attackers if run.attackers.any() else None,
                               xla=run.options.engine.xla, levels=run.options.eval.levels)

    def evaluate_run(params, rounds_done: int) -> dict:
        view = _one_copy(devices.local_view(params))
        return evaluator(view, run.eval_state(view, rounds_done), run.data)

    return evaluate_run
