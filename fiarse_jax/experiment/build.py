"""Construction: everything a run is built from, derived from its config alone.

``build_run(config)`` validates the config, parses it into the typed ``Options``
(``config.round_options``) and builds data → model → initial params → mask policy → model
functions; pretrained weights and the simulated attackers are decided here too. Nothing
here trains: ``algorithm.build_algorithm`` turns the ``Run`` into rounds, ``train`` runs
them. ``Run`` itself is ``federated.run.Run`` (re-exported here).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fiarse_jax import models, policies
from fiarse_jax.core.capacities import assign_capacities
from fiarse_jax.data import DATASETS, federate, load_from_config
from fiarse_jax.experiment.config import ConfigError, round_options, validate_config
from fiarse_jax.federated.run import Run
from fiarse_jax.robust import attacks
from fiarse_jax.robust.attacks import AttackOptions

__all__ = ["Run", "build_model", "build_run", "choose_attackers", "load_pretrained",
           "make_model_fns"]


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


def build_run(config, *, pretrained: bool = True) -> Run:
    """Validate ``config`` and build data, model, initial params and policy from it.

    Args:
      config: the run's ``ConfigDict``; parsed once into ``Run.options``
        (``config.round_options``).
      pretrained: start from ``config.model.pretrained``'s weights (when set); False
        when a checkpoint will replace the initial parameters anyway (resume, export), so
        that those need not find the weights again.

    Returns:
      The ``Run``: options, federated data, model, initial params, policy, loss and
      logits functions, capacity assignment and simulated attackers.

    Raises:
      ConfigError: the first bad field, in one line (nothing is built or written).
    """
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
    options = round_options(config)
    assignment = assign_capacities(options.schedule.num_clients, len(capacities))
    attackers = choose_attackers(options.attack, options.schedule.seed, assignment)
    if options.attack.kind == "label_flip":   # the attackers train on flipped labels
        data = data._replace(train=data.train._replace(y=attacks.flip_labels(
            data.train.y, data.num_classes, jnp.asarray(attackers))))
    return Run(options, capacities, data, model, params, train_key, unit_groups,
               policy, logits_fn, loss_fn, assignment, jax.jit(policy.prepare), attackers,
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


def choose_attackers(attack: AttackOptions, seed: int, assignment: np.ndarray) -> np.ndarray:
    """bool[num_clients]: the clients ``attack`` marks as malicious, a pure function of the
    run's ``seed`` (none when ``fraction`` is 0). With kind ``none`` they stay honest: a clean
    twin of an attacked run, scored on the same honest clients (``local_accuracy_honest``)."""
    if attack.fraction == 0:
        return np.zeros(len(assignment), bool)
    return attacks.choose_attackers(seed + 1, len(assignment), attack.fraction,
                                    levels=tuple(attack.levels) or None, assignment=assignment)
