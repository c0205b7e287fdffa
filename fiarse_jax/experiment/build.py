"""Construction: everything a run is built from, derived from its config alone.

``build_run(config)`` validates the config and builds data → model → initial params →
mask policy → model functions; the optimiser, the client's local steps and compute dtype,
pretrained weights and the simulated attackers are decided here too. Nothing here trains:
``algorithm.build_algorithm`` turns a ``Run`` into rounds, ``train`` runs them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fiarse_jax import models, policies
from fiarse_jax.core import rng
from fiarse_jax.core.capacities import assign_capacities
from fiarse_jax.data import DATASETS, federate, load_from_config
from fiarse_jax.experiment.config import ConfigError, validate_config
from fiarse_jax.robust import attacks

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
        ds = load_from_config(d)
    except (RuntimeError, ValueError) as e:   # data absent (how to get it), bad tokenizer
        raise ConfigError(f"config.data: {e}") from None
    try:
        data = federate(ds, num_clients=d.num_clients, alpha=d.alpha,
                        test_fraction=d.test_fraction, min_client_size=d.min_client_size,
                        seed=config.seed,
                        global_order=config.get("eval", {}).get("global_order", "clients"),
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
    opts = {k: v for k, v in config.model.items() if k not in models.RUN_MODEL_FIELDS}
    name = config.model.name
    try:   # pretrained weights, token ids: the model's needs against the data
        models.check_model_for_data(config.model, token_ids=bool(ds.model_options),
                                    data_name=config.data.name,
                                    text_datasets=[n for n, s in DATASETS.items() if s.token_ids])
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    if ds.model_options:
        fields = {f.name: f.default for f in dataclasses.fields(models.MODELS[name])}
        missing = sorted(set(ds.model_options) - set(fields))
        if missing:
            raise ConfigError(f"config.model.name = {name!r}: dataset {config.data.name!r} "
                              f"gives token ids and fixes {missing}; use a text model "
                              f"({', '.join(repr(n) for n in models.text_models())})")
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
    """bool[num_clients]: the clients ``config.attack`` marks as malicious, a pure function
    of the seed (none when ``fraction`` is 0). With kind ``none`` they stay honest: a clean
    twin of an attacked run, scored on the same honest clients (``local_accuracy_honest``)."""
    a = config.attack
    if a.fraction == 0:
        return np.zeros(len(assignment), bool)
    return attacks.choose_attackers(config.seed + 1, len(assignment), a.fraction,
                                    levels=tuple(a.levels) or None, assignment=assignment)
