"""``train_and_evaluate(config, workdir)``: the federated training loop.

Data flows config → data → model → mask policy → client engine → server →
metrics. Per round: sample clients (a pure function of seed and round), let the
policy prepare every level's extraction from the global model (one sort), give
each client its spec, run the clients with the chosen strategy, aggregate the
deltas over holders, and evaluate every ``eval_every`` rounds.

Outputs in ``workdir``: ``metrics.jsonl`` (one JSON object per evaluation),
``summary.json`` (config, final metrics, kept fractions, costs, timing) and
``checkpoints/`` (Orbax; see ``checkpoint``): running the same command again on the
same ``workdir`` resumes from the latest checkpoint and gives the uninterrupted
run's results bit for bit.

Across processes (after ``jax.distributed.initialize``, strategy ``sharded``) every
process runs this same loop; process 0 alone writes the JSON files and the summary.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from fiarse_jax import (
    attacks,
    checkpoint,
    costs,
    engine,
    evaluate,
    models,
    policies,
    privacy,
    rng,
    server_round,
    validation,
)
from fiarse_jax import client as client_lib
from fiarse_jax import metrics as metrics_lib
from fiarse_jax.config import RUN_MODEL_FIELDS, ConfigError, stream_blocker, validate_config
from fiarse_jax.data import federate, load_dataset
from fiarse_jax.data.federated import LOADER_OPTIONS
from fiarse_jax.data.summary import federated_summary
from fiarse_jax.masks import maskable_flags, path_names


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss became NaN); the message says why."""


def sample_clients(seed: int, round_index: int, num_clients: int, per_round: int) -> np.ndarray:
    """The round's clients, uniformly without replacement; a pure function of (seed, round)."""
    rng = np.random.default_rng([seed, round_index])
    return np.sort(rng.choice(num_clients, per_round, replace=False))


def assign_capacities(num_clients: int, num_levels: int) -> np.ndarray:
    """Level index per client in equal contiguous blocks (clients 0..N/L−1 → level 0, …)."""
    return (np.arange(num_clients) * num_levels) // num_clients


def eval_batch_size(config) -> int:
    """``eval.batch_size``, or ``client.batch_size`` when 0 or absent (the authors score
    every test set in batches of their client batch size)."""
    b = config.get("eval", {}).get("batch_size", 0)
    return int(b) if b else int(config.client.batch_size)


#: config.engine.dtype → the client's compute dtype (None: the parameters' own).
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def local_steps(config, train_sizes) -> int:
    """K, the local steps a round runs: ``client.local_steps``, or with
    ``client.local_epochs`` E > 0 the largest client's ⌈E·n/batch⌉ (each client stops at
    its own count; see ``client.make_client_fns``)."""
    epochs = config.client.get("local_epochs", 0.0)
    if epochs <= 0:
        return int(config.client.local_steps)
    return max(1, math.ceil(epochs * int(np.max(train_sizes)) / config.client.batch_size))


def make_optimizer(config) -> optax.GradientTransformation:
    """The client optimiser, created afresh every round (clients keep no state).

    ``sgd``: plain SGD (no momentum, no weight decay), as the paper's CIFAR runs.
    ``adamw``: optax's AdamW with ``client.betas`` and ``client.weight_decay`` (optax's
    defaults (0.9, 0.999) and 1e-4 when a config lacks them; the paper's AG News runs
    use (0.9, 0.95) and 0).
    """
    c = config.client
    if c.optimizer == "sgd":
        return optax.sgd(c.learning_rate)
    b1, b2 = (float(b) for b in c.get("betas", (0.9, 0.999)))
    return optax.adamw(c.learning_rate, b1=b1, b2=b2, weight_decay=c.get("weight_decay", 1e-4))


def make_model_fns(model, policy):
    """``logits_fn(params, x, spec=None)`` and ``loss_fn(params, x, y, rng, spec)``.

    With ``spec=None`` the logits are the model's own output (the full model).
    A policy with a ``readout`` (early exits) gets the stacked exit outputs: its
    ``objective`` is the training loss and its ``readout`` picks a sub-model's logits.
    """
    exits = policy.readout is not None

    def outputs(p, x):
        return model.apply({"params": p}, x, exits=True) if exits else model.apply({"params": p}, x)

    def logits_fn(p, x, spec=None):
        if spec is None or not exits:
            return model.apply({"params": p}, x)
        return policy.readout(outputs(p, x), spec)

    def loss_fn(p, x, y, rng, spec):   # in float32 whatever the compute dtype
        del rng
        if policy.objective is not None:
            return policy.objective(outputs(p, x).astype(jnp.float32), y, spec)
        logits = logits_fn(p, x, spec).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return logits_fn, loss_fn


@jax.jit
def update_norms(deltas) -> jax.Array:
    """L2 norm of each client's delta (leading client axis) over the whole pytree."""
    sq = sum(jnp.sum(jnp.square(d.reshape(d.shape[0], -1)), axis=1)
             for d in jax.tree_util.tree_leaves(deltas))
    return jnp.sqrt(sq)


def kept_fractions(policy, params, round_state, capacities, is_maskable=None, key=None
                   ) -> tuple[list[float], list[dict[str, float]]]:
    """Per level: the fraction of maskable scalars its sub-model keeps, overall and per
    top-level module (layer); ``key``: a random policy's draw (default ``PRNGKey(0)``)."""
    key = jax.random.PRNGKey(0) if key is None else key
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    layers = [path_names(p)[0] for p, _ in flat]
    flags = maskable_flags(params, is_maskable)
    total = sum(l.size for (_, l), f in zip(flat, flags) if f)
    overall, per_layer = [], []
    for lvl in range(len(capacities)):
        spec = policy.client_spec(round_state, lvl, key)
        m = jax.tree_util.tree_leaves(policy.mask(params, spec))
        kept, size = {}, {}
        for x, f, layer in zip(m, flags, layers):
            if f:
                kept[layer] = kept.get(layer, 0.0) + float(x.sum())
                size[layer] = size.get(layer, 0) + x.size
        overall.append(sum(kept.values()) / total)
        per_layer.append({k: kept[k] / size[k] for k in kept})
    return overall, per_layer


class Run(NamedTuple):
    """Everything a run is built from, derived from its config alone (no state)."""

    config: Any
    capacities: tuple[float, ...]
    data: Any                       # FederatedData
    model: Any
    init_params: Any
    train_key: jax.Array
    unit_groups: Any
    policy: policies.MaskPolicy
    logits_fn: Any                  # (params, x, spec=None) -> logits
    loss_fn: Any                    # (params, x, y, rng, spec) -> loss
    assignment: np.ndarray          # client -> capacity level index
    prepare: Any                    # jitted policy.prepare
    attackers: Any = None           # bool[num_clients]: the simulated malicious clients
    train_transform: Any = None     # (x, key) -> x: on-device augmentation, or None
    eval_transform: Any = None      # x -> x: evaluation preprocessing, or None
    x_one: Any = None               # one preprocessed input (model init, FLOP counts)
    is_maskable: Any = None         # the model's own maskability rule, or None (default)

    def eval_state(self, params, rounds_done: int):
        """The policy's round state the evaluation after ``rounds_done`` rounds uses: the
        last trained round's (index ``rounds_done − 1``, its key; FedRolex: the window
        trained last) on ``params``; before any round, round 0's."""
        last = max(rounds_done - 1, 0)
        return self.prepare(params, last, rng.round_streams(self.train_key, last)["policy"])

    @property
    def eval_key(self) -> jax.Array:
        """The key every evaluation draws a random policy's sub-model with (``rng``)."""
        return rng.eval_key(self.train_key)


def build_run(config, *, pretrained: bool = True) -> Run:
    """Validate ``config`` and build data, model, initial params and policy from it.

    ``pretrained``: start from ``config.model.pretrained``'s weights (when set); False
    when a checkpoint will replace the initial parameters anyway (resume, export), so
    that those need not find the weights again."""
    validate_config(config)
    capacities = tuple(float(c) for c in config.capacities)
    d = config.data
    try:
        ds = load_dataset(d.name, **{k: d[k] for k in LOADER_OPTIONS[d.name] if k in d})
    except (RuntimeError, ValueError) as e:   # data absent (how to get it), bad tokenizer
        raise ConfigError(f"config.data: {e}") from None
    try:
        data = federate(ds, num_clients=d.num_clients, alpha=d.alpha,
                        test_fraction=d.test_fraction, min_client_size=d.min_client_size,
                        seed=config.seed,
                        **{k: d[k] for k in ("partition", "n_train", "n_test", "classes_per_client")
                           if k in d})
    except ValueError as e:  # e.g. too many clients for the data at this alpha
        raise ConfigError(f"config.data: {e}") from None

    model = build_model(config, ds)
    init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
    x_one = data.train.x[0, :1]
    if ds.eval_transform is not None:
        x_one = ds.eval_transform(x_one)
    params = jax.jit(model.init)(init_key, x_one)["params"]   # jitted: one compile, not per op
    if pretrained:
        params = load_pretrained(config, model, params)

    unit_groups = model.unit_groups(params) if hasattr(model, "unit_groups") else None
    # A model may declare its own maskability rule and layer-scope θ groups (RoBERTa does).
    is_maskable = getattr(model, "is_maskable", None)
    try:
        policy = policies.build_policy(config.method, capacities,
                                       dict(config.get(config.method, {})),
                                       unit_groups=unit_groups, is_maskable=is_maskable,
                                       group_fn=getattr(model, "threshold_group", None))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.{config.method}: {e}") from None
    logits_fn, loss_fn = make_model_fns(model, policy)
    assignment = assign_capacities(config.data.num_clients, len(capacities))
    attackers = choose_attackers(config, assignment)
    if config.attack.kind == "label_flip":   # the attackers train on flipped labels
        data = data._replace(train=data.train._replace(y=attacks.flip_labels(
            data.train.y, data.num_classes, jnp.asarray(attackers))))
    return Run(config, capacities, data, model, params, train_key, unit_groups, policy,
               logits_fn, loss_fn, assignment, jax.jit(policy.prepare), attackers,
               ds.train_transform, ds.eval_transform, x_one, is_maskable)


def load_pretrained(config, model, params):
    """``params`` replaced by ``config.model.pretrained``'s weights (unchanged when unset);
    a hub name missing from the local cache is downloaded when ``config.data.download``."""
    source = config.model.get("pretrained", "")
    if not source:
        return params
    try:
        return model.load_pretrained(source, params,
                                     download=bool(config.data.get("download", False)))
    except (OSError, ValueError, ImportError) as e:   # ImportError: no safetensors
        raise ConfigError(f"config.model.pretrained = {source!r}: {e}") from None


def build_model(config, ds):
    """The model of ``config.model`` for dataset ``ds``; fields the data fixes
    (``ds.model_options``: a tokenizer's vocabulary size, the sequence length) are
    filled in, and a config value that contradicts one is an error naming both."""
    opts = {k: v for k, v in config.model.items() if k not in RUN_MODEL_FIELDS}
    name = config.model.name
    if config.model.get("pretrained") and not hasattr(models.MODELS.get(name), "load_pretrained"):
        raise ConfigError(f"config.model.pretrained: model {name!r} cannot load pretrained "
                          "weights (only 'roberta' can)")
    if getattr(models.MODELS[name], "takes_token_ids", False) and not ds.model_options:
        raise ConfigError(f"config.model.name = {name!r} reads token ids; dataset "
                          f"{config.data.name!r} is not text (use 'ag_news')")
    if ds.model_options:
        fields = {f.name: f.default for f in dataclasses.fields(models.MODELS[name])}
        missing = sorted(set(ds.model_options) - set(fields))
        if missing:
            raise ConfigError(f"config.model.name = {name!r}: dataset {config.data.name!r} "
                              f"gives token ids and fixes {missing}; use a text model "
                              "('roberta')")
        for k, v in ds.model_options.items():
            if opts.get(k, fields[k]) not in (fields[k], v):   # the class default = unset
                raise ConfigError(f"config.model.{k} = {opts[k]!r} contradicts the data "
                                  f"({k} = {v!r} from config.data); leave it 0 or set {v!r}")
            opts[k] = v
    try:
        return models.build_model(name, ds.num_classes, opts)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model: {e}") from None


def choose_attackers(config, assignment: np.ndarray) -> np.ndarray:
    """bool[num_clients]: ``config.attack``'s malicious clients (none when kind is none),
    a pure function of the seed."""
    a = config.attack
    if a.kind == "none":
        return np.zeros(len(assignment), bool)
    return attacks.choose_attackers(config.seed + 1, len(assignment), a.fraction,
                                    levels=tuple(a.levels) or None, assignment=assignment)


def noise_multiplier(config, spent: list | None = None, planned_rounds: int | None = None
                     ) -> float:
    """σ of DP-FedAvg for the rounds still to run: ``dp.noise_multiplier``, or calibrated to
    ``dp.target_epsilon`` over ``num_rounds`` (0: no DP).

    ``spent``: the ``[rounds, σ]`` segments a resumed run already ran (``dp_segments`` in
    its checkpoint), planned for ``planned_rounds`` rounds. With a target, σ stays the last
    segment's when ``num_rounds`` is still the planned one (bit-for-bit resumes); when it
    changed, σ for the remaining rounds is calibrated on top of what was spent
    (``privacy.calibrate_remaining``), so that the whole run spends the target."""
    if config.dp.target_epsilon <= 0:
        return float(config.dp.noise_multiplier)
    opts = dict(sampling_rate=sampling_rate(config), delta=config.dp.delta,
                accountant=config.dp.accountant)
    if not spent:
        return privacy.calibrate_noise(config.dp.target_epsilon, config.num_rounds, **opts)
    done = sum(int(n) for n, _ in spent)
    if planned_rounds == config.num_rounds or done >= config.num_rounds:
        return float(spent[-1][1])   # the planned run, or no round left to run
    try:
        return privacy.calibrate_remaining(config.dp.target_epsilon, [tuple(x) for x in spent],
                                           config.num_rounds - done, **opts)
    except ValueError as e:
        raise ConfigError(f"config.dp.target_epsilon = {config.dp.target_epsilon}: {e}") from None


def dp_segments(spent: list, rounds: int, sigma: float) -> list[list]:
    """``spent`` followed by ``rounds`` rounds at ``sigma`` (merged into the last segment
    when its σ is the same): the σ history a checkpoint keeps for DP accounting."""
    out = [list(x) for x in spent]
    if out and out[-1][1] == sigma:
        out[-1][0] += rounds
    elif rounds > 0:
        out.append([rounds, sigma])
    return out


def auto_chunk(config, fns, reduce, strategy: str, inputs) -> int:
    """``engine.clients_per_chunk = "auto"``: the most clients per device trained at once
    whose round fits ``engine.memory_budget_gb`` (GiB; 0: 90 % of the device memory still
    free), by XLA's compiled peak of the client round (``engine.fit_chunk``; every round
    has the same shapes, so one round's answer holds for all). The server step is not
    counted: with stacked server inputs and a robust rule, leave headroom. ``inputs()``
    gives (params, keys, specs, data) of a round. ``loop`` trains one client at a time
    anyway: 0. Across processes every one decides, and all take the smallest answer."""
    if strategy == "loop":
        return 0
    budget_gb = config.engine.get("memory_budget_gb", 0.0)
    params, keys, specs, data = inputs()
    if strategy == "sharded":   # the chunk is per device: fit one device's share
        per_device = -(-keys.shape[0] // jax.device_count())
        keys, specs, data = jax.tree_util.tree_map(lambda a: a[:per_device], (keys, specs, data))
    n, t0 = keys.shape[0], time.time()
    try:
        budget = int(budget_gb * 2**30) if budget_gb > 0 else engine.memory_budget()
        chunk, peak = engine.fit_chunk(fns, params, specs, data, keys, budget_bytes=budget,
                                       reduce=reduce)
        problem = ""
    except (MemoryError, RuntimeError) as e:
        chunk, peak, problem = -1, 0, str(e)
    if jax.process_count() > 1:   # one program everywhere: the smallest answer, or all fail
        from jax.experimental import multihost_utils
        answers = np.asarray(multihost_utils.process_allgather(
            np.int32(n if chunk == 0 else chunk))).ravel()
        if chunk >= 0 and answers.min() < 0:
            problem = "it does not fit on another process"
        smallest = int(answers.min())
        chunk = -1 if smallest < 0 else (0 if smallest == n else smallest)
    if chunk < 0:
        raise ConfigError(f"config.engine.clients_per_chunk = 'auto': {problem}; raise "
                          "config.engine.memory_budget_gb if it is set too low, free device "
                          "memory, or lower config.client.batch_size")
    if jax.process_index() == 0:
        print(f"engine: clients_per_chunk = auto → {chunk or n} of {n} clients at once"
              f"{' per device' if strategy == 'sharded' else ''} (XLA's compiled peak "
              f"{engine.size_text(peak)}, budget {engine.size_text(budget)}; "
              f"{time.time() - t0:.0f} s to decide)", flush=True)
    return chunk


def stream_updates(config) -> bool:
    """Whether rounds sum the server's inputs while clients train (``config.engine.reduce``:
    ``auto`` streams whenever the server rule allows, ``stream`` always (``validate_config``
    refuses it where it cannot), ``stack`` never)."""
    mode = config.engine.get("reduce", "auto")
    return mode == "stream" or (mode == "auto" and stream_blocker(config) is None)


def sampling_rate(config) -> float:
    return config.clients_per_round / config.data.num_clients


def make_divisor(policy, capacities, assignment, q: float):
    """Jitted ``(params, round_state) -> divisor`` for DP: the expected number of sampled
    holders per coordinate, from every level's (public) mask."""
    counts = [int((assignment == i).sum()) for i in range(len(capacities))]

    def divisor(params, round_state):
        level_masks = [policy.mask(params, policy.client_spec(round_state, lvl,
                                                              jax.random.PRNGKey(0)))
                       for lvl in range(len(capacities))]
        stacked = jax.tree_util.tree_map(lambda *m: jnp.stack(m), *level_masks)
        return privacy.expected_holders(stacked, counts, q)

    return jax.jit(divisor)


def build_server(config, sigma: float, streaming: bool):
    """(streamed server or None, stacked server step) of ``config``'s rule, DP noise σ."""
    options = dict(config.server.get(config.server.aggregator, {}))
    stream = (server_round.make_streaming_round(
        server_lr=config.server.learning_rate, dp_noise_multiplier=sigma,
        dp_clip_norm=config.dp.clip_norm, aggregator=config.server.aggregator,
        aggregator_options=options) if streaming else None)
    server_step = server_round.make_server_round(
        aggregator=config.server.aggregator, aggregator_options=options,
        z_threshold=config.server.z_threshold if config.server.validate else None,
        cosine_threshold=config.server.cosine_threshold if config.server.validate else None,
        server_lr=config.server.learning_rate, dp_noise_multiplier=sigma,
        dp_clip_norm=config.dp.clip_norm)
    return stream, server_step


def train_and_evaluate(config, workdir: str, *, progress: bool | None = None) -> dict[str, Any]:
    """Train ``config.method`` federatedly and evaluate it; returns the summary dict.

    ``progress``: show a tqdm bar (``None``: only on an interactive terminal).
    """
    t_start = time.time()
    ckpt_dir = os.path.join(workdir, "checkpoints")
    # Pretrained weights are read only for a fresh start (a checkpoint holds every param).
    may_resume = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
    run = build_run(config, pretrained=not may_resume)
    capacities, data, model, params = run.capacities, run.data, run.model, run.init_params
    policy, train_key, assignment, unit_groups = (run.policy, run.train_key, run.assignment,
                                                  run.unit_groups)
    loss_fn = run.loss_fn
    fns = client_lib.make_client_fns(loss_fn, policy, make_optimizer(config),
                                     num_steps=local_steps(config, data.train_sizes),
                                     local_epochs=config.client.get("local_epochs", 0.0),
                                     batch_size=config.client.batch_size,
                                     augment=run.train_transform,
                                     min_rows=int(np.min(data.train_sizes)),
                                     compute_dtype=COMPUTE_DTYPES[config.engine.dtype])
    sigma = noise_multiplier(config)   # a resume may recalibrate it (below)
    attack_kind = config.attack.kind if config.attack.kind in attacks.KINDS else "none"
    streaming = stream_updates(config)
    stream, server_step = build_server(config, sigma, streaming)
    reduce = stream.contribution if streaming else None
    divisor_fn = (make_divisor(policy, capacities, assignment, sampling_rate(config))
                  if sigma > 0 else lambda params, state: 0.0)
    attack = jax.jit(functools.partial(attacks.attack_updates, attack_kind,
                                       scale=config.attack.scale,
                                       noise_std=config.attack.noise_std))
    evaluator = evaluate.make_evaluator(run.logits_fn, policy, capacities, assignment,
                                        batch_size=eval_batch_size(config), key=run.eval_key,
                                        transform=run.eval_transform)
    prepare = run.prepare
    client_specs = jax.jit(jax.vmap(policy.client_spec, in_axes=(None, 0, 0)))

    strategy = engine.resolve_strategy(config.engine.strategy)
    multi, lead = jax.process_count() > 1, jax.process_index() == 0
    if multi and strategy != "sharded":
        raise ConfigError(f"config.engine.strategy = {config.engine.strategy!r}: across "
                          f"{jax.process_count()} processes only 'sharded' runs")

    def round_inputs(view, rnd):
        """Round ``rnd``'s clients, named key streams (``rng.ROUND_STREAMS``), policy state,
        client keys, specs (drawn with each client's ``spec`` stream) and data."""
        ids = sample_clients(config.seed, rnd, config.data.num_clients, config.clients_per_round)
        streams = rng.round_streams(train_key, rnd)
        round_state = prepare(view, rnd, streams["policy"])
        keys = rng.client_keys(streams["clients"], jnp.asarray(ids))
        spec_keys = jax.vmap(lambda k: rng.client_streams(k)["spec"])(keys)
        specs = client_specs(round_state, jnp.asarray(assignment[ids]), spec_keys)
        batch = jax.tree_util.tree_map(lambda a: a[ids], data.train)
        return ids, streams, round_state, keys, specs, batch

    chunk = config.engine.clients_per_chunk
    if chunk == "auto":
        # Shapes are all that matter, and every round has the same: round 0 on the initial
        # params decides, before anything is written.
        chunk = auto_chunk(config, fns, reduce, strategy,
                           lambda: (params, *round_inputs(params, 0)[3:]))
    run_clients = engine.make_round_runner(fns, strategy, clients_per_chunk=chunk,
                                           reduce=reduce)
    os.makedirs(workdir, exist_ok=True)
    # An existing checkpoint directory is resumed from even when this config saves none.
    ckpt = (checkpoint.RunCheckpoints(workdir, keep=config.keep_checkpoints)
            if config.checkpoint_every > 0 or os.path.isdir(os.path.join(workdir, "checkpoints"))
            else None)
    start, history, round_rows, resumed_from, spent = 0, [], [], None, []
    if ckpt is not None:
        template = checkpoint.run_state(params, 0, train_key, assignment)
        restored, warnings = ckpt.restore_latest(
            template, lambda step, meta: (checkpoint.check_format(meta),
                                          checkpoint.check_resumable(meta["config"], config,
                                                                     step)))
        for w in warnings:
            print(f"fiarse-jax: warning: {w}", file=sys.stderr, flush=True)
        if restored is not None:
            resumed_from, state, meta = restored
            if (not np.array_equal(np.asarray(state["key"]), np.asarray(train_key))
                    or not np.array_equal(np.asarray(state["assignment"]), assignment)):
                raise ConfigError("the checkpoint's PRNG key or capacity assignment differs from "
                                  "this config's (made by another version of the code?); "
                                  "use a new --workdir")
            start, params, history = resumed_from, state["params"], list(meta["history"])
            round_rows = list(meta.get("rounds", []))
            if sigma > 0:   # the σ history so far (every format-2 checkpoint keeps it)
                spent = meta["dp_segments"]
                new_sigma = noise_multiplier(config, spent, meta["config"]["num_rounds"])
                if new_sigma != sigma:
                    if lead:
                        print(f"DP: σ = {new_sigma:.4g} for rounds {start + 1}–"
                              f"{config.num_rounds} (σ history {spent}), so that the whole "
                              f"run spends ε = {config.dp.target_epsilon}", flush=True)
                    sigma = new_sigma
                    stream, server_step = build_server(config, sigma, streaming)
                    reduce = stream.contribution if streaming else None
                    run_clients = engine.make_round_runner(fns, strategy, clients_per_chunk=chunk,
                                                           reduce=reduce)
            print(f"resuming from the checkpoint at round {resumed_from} "
                  f"({config.num_rounds - resumed_from} rounds to go)", flush=True)
    if resumed_from is None and may_resume:   # no checkpoint was readable: a fresh start
        params = load_pretrained(config, model, params)

    if strategy == "sharded":
        params = engine.replicate(params)   # on every device, beside the sharded deltas
    # Across processes (jax.distributed): every process runs this loop on the same inputs;
    # arrays the server step reads are global, and process 0 alone writes files.
    glob = engine.replicate if multi else (lambda x: x)
    if start == 0 and lead:   # who holds what, written before any training
        metrics_lib.write_atomic(os.path.join(workdir, "partition.json"),
                                 json.dumps(federated_summary(data)))
    # The JSON-lines files are rewritten from the checkpoint's rows, so rounds a killed
    # run logged after its last checkpoint are not duplicated.
    writer = (metrics_lib.MetricWriter(workdir, evals=history, rounds=round_rows,
                                       tensorboard=config.tensorboard)
              if lead else metrics_lib.NullWriter())
    # --config.profile: a jax.profiler trace of one round after the compiling one.
    profile_round = (min(start + 1, config.num_rounds - 1) if config.profile else -1)
    bar = tqdm(range(start, config.num_rounds), desc=f"{config.method}", unit="round",
               initial=start, total=config.num_rounds,
               disable=(not progress or not lead) if progress is not None else
               (None if lead else True))
    try:
        for rnd in bar:
            t_round = time.time()
            if rnd == profile_round:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
            view = engine.local_view(params)
            ids, streams, round_state, keys, specs, batch = round_inputs(view, rnd)
            in_round = run.attackers[ids]
            server_key = glob(streams["server"])
            divisor = glob(divisor_fn(view, round_state))
            if streaming:   # the server's sums accumulate while the clients train
                sums, stats = run_clients(view, specs, batch, keys)
                params = stream.finish(params, sums, server_key, divisor)
                losses, info, norms = stats.loss, stats._asdict(), stats.norm
            else:
                result = run_clients(view, specs, batch, keys)
                deltas = (attack(result.delta, result.mask, glob(jnp.asarray(in_round)),
                                 glob(streams["attack"]))
                          if attack_kind != "none" and in_round.any() else result.delta)
                params, info = server_step(params, deltas, result.mask,
                                           glob(jnp.asarray(assignment[ids])), server_key,
                                           divisor)
                losses, norms = result.loss, update_norms(deltas)
            # the round's one wait for the device
            train_loss = float(engine.to_host(losses).mean())
            if rnd == profile_round:
                jax.profiler.stop_trace()
            if not np.isfinite(train_loss):
                raise TrainingError(
                    f"training diverged in round {rnd + 1} (mean client loss {train_loss}); "
                    f"lower config.client.learning_rate ({config.client.learning_rate}) or "
                    f"config.server.learning_rate ({config.server.learning_rate})")
            done = rnd + 1
            accepted, reason = engine.to_host(info["accepted"]), engine.to_host(info["reason"])
            norms = engine.to_host(norms)[accepted]
            row = {"round": done, "train_loss": train_loss,
                   "update_norm_mean": float(norms.mean()) if norms.size else 0.0,
                   "update_norm_max": float(norms.max()) if norms.size else 0.0,
                   "rejected": int((~accepted).sum()),
                   **{f"rejected_{name}": int((reason == i).sum())
                      for i, name in enumerate(validation.REASONS) if i > 0},
                   "round_time_s": round(time.time() - t_round, 4)}
            if config.attack.kind != "none":
                row["attackers"] = int(in_round.sum())
            if not accepted.any():
                print(f"fiarse-jax: warning: round {done}: every update was rejected; "
                      "the model is unchanged", file=sys.stderr, flush=True)
            if sigma > 0:
                row["dp_epsilon"] = privacy.epsilon_for_history(
                    dp_segments(spent, done - start, sigma), sampling_rate=sampling_rate(config),
                    delta=config.dp.delta, accountant=config.dp.accountant)
            round_rows.append(row)
            writer.write_round(row)
            if done % config.eval_every == 0 or done == config.num_rounds:
                view = engine.local_view(params)
                m = evaluator(view, run.eval_state(view, done), data)
                m = {"round": done, "train_loss": train_loss, **m,
                     "elapsed_s": round(time.time() - t_start, 2)}
                history.append(m)
                writer.write_eval(m)
                bar.set_postfix(acc=f"{m['global_accuracy']:.3f}", loss=f"{train_loss:.3f}")
                if bar.disable and lead:
                    local = ", ".join(f"{k}: {v:.1%}" for k, v in m["local_accuracy"].items())
                    print(f"round {done}/{config.num_rounds}: full model "
                          f"{m['global_accuracy']:.1%} | local by capacity {local} | "
                          f"train loss {train_loss:.3f}", flush=True)
            if config.checkpoint_every > 0 and (done % config.checkpoint_every == 0
                                                or done == config.num_rounds):
                ckpt.save(done, checkpoint.run_state(params, done, train_key, assignment),
                          # copies: the async save serialises them later
                          {"format": checkpoint.FORMAT,
                           "config": config.to_dict(), "history": list(history),
                           "rounds": list(round_rows),
                           "dp_segments": dp_segments(spent, done - start, sigma)})
    finally:
        writer.close()
        if ckpt is not None:
            ckpt.close()

    params = engine.local_view(params)
    final_state = run.eval_state(params, config.num_rounds)
    labels = [evaluate.capacity_label(c) for c in capacities]
    kept_overall, kept_layers = kept_fractions(policy, params, final_state, capacities,
                                               run.is_maskable, run.eval_key)
    cost = costs.capacity_costs(model, params, policy, final_state, capacities,
                                structured=config.method in policies.STRUCTURED,
                                unit_groups=unit_groups, x_one=run.x_one,
                                is_maskable=run.is_maskable, key=run.eval_key)
    summary = {
        "config": config.to_dict(),
        "final": history[-1],
        "capacities": dict(zip(labels, capacities)),
        "kept_fraction": dict(zip(labels, kept_overall)),
        "kept_fraction_per_layer": dict(zip(labels, kept_layers)),
        "costs": cost,
        "num_classes": data.num_classes,
        "num_params": int(sum(l.size for l in jax.tree_util.tree_leaves(params))),
        "clients_per_level": {evaluate.capacity_label(c): int((assignment == i).sum())
                              for i, c in enumerate(capacities)},
        "strategy": strategy,
        "clients_per_chunk": 1 if strategy == "loop" else chunk,
        "server_inputs": "streamed" if streaming else "stacked",
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "resumed_from_round": resumed_from,
        "attackers": int(run.attackers.sum()),
        "dp": ({"noise_multiplier": sigma, "epsilon": round_rows[-1].get("dp_epsilon"),
                "delta": config.dp.delta,
                "segments": dp_segments(spent, config.num_rounds - start, sigma)}
               if sigma > 0 else None),
        "wall_time_s": round(time.time() - t_start, 2),
    }
    if lead:
        metrics_lib.write_atomic(os.path.join(workdir, "summary.json"),
                                 json.dumps(summary, indent=2, default=_jsonable))
    return summary


def _jsonable(x):
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, (tuple, set)):
        return list(x)
    return str(x)
