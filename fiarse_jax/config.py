"""Config validation: every bad value stops the run before any work, in one line."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from fiarse_jax import (
    aggregators,
    attacks,
    engine,
    evaluate,
    fiarse,
    masks,
    models,
    policies,
    privacy,
    server_round,
)
from fiarse_jax.data import federated, text  # text imports tokenizers only on use

OPTIMIZERS = ("sgd", "adamw")
#: config.model fields that configure the run, not the Flax module (build_run, export).
RUN_MODEL_FIELDS = ("name", "pretrained")
#: attacks.KINDS act on updates; label_flip on the attackers' training labels.
ATTACK_KINDS = attacks.KINDS + ("label_flip",)


def parse_config_arg(arg: str | None, **groups: tuple[str, ...]) -> dict[str, str]:
    """The choices in a config file's argument (``--config file.py:four,layer``): every
    comma-separated part picks one option of its group; a group not named keeps its first
    option ('' for an off switch). An unknown part is a ValueError listing the options."""
    chosen = {g: options[0] for g, options in groups.items()}
    for part in filter(None, (p.strip() for p in (arg or "").split(","))):
        group = next((g for g, options in groups.items() if part in options), None)
        if group is None:
            raise ValueError(f"config argument {part!r}: expected " + ", ".join(
                "|".join(o for o in options if o) for options in groups.values()))
        chosen[group] = part
    return chosen


class ConfigError(ValueError):
    """A config field holds a value the run cannot use."""


def _get(config, field: str) -> Any:
    node = config
    for part in field.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            raise ConfigError(f"config.{field} is missing") from None
    return node


def _fail(field: str, value: Any, allowed: str):
    raise ConfigError(f"config.{field} = {value!r}: {allowed}")


def _int(config, field: str, lo: int = 1, hi: int | None = None) -> int:
    v = _get(config, field)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        _fail(field, v, f"must be an integer in [{lo}, {hi}]" if hi is not None
              else f"must be an integer ≥ {lo}")
    return v


def _positive(config, field: str) -> float:
    v = _get(config, field)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
        _fail(field, v, "must be a finite number > 0")
    return float(v)


def _number(config, field: str, lo: float, hi: float, *, lo_open: bool = False,
            hi_open: bool = False) -> float:
    v = _get(config, field)
    ok = (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
          and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))
    if not ok:
        _fail(field, v, f"must be a finite number in {'(' if lo_open else '['}{lo}, "
              f"{hi}{')' if hi_open else ']'}")
    return float(v)


def _bool(config, field: str) -> bool:
    v = _get(config, field)
    if not isinstance(v, bool):
        _fail(field, v, "must be True or False")
    return v


def _choice(config, field: str, allowed) -> str:
    v = _get(config, field)
    if v not in allowed:
        _fail(field, v, f"must be one of {sorted(allowed)}")
    return v


def _check_model(config) -> None:
    """The model exists, every field is one it has, and layer sizes are positive ints."""
    name = _choice(config, "model.name", models.MODELS)
    known = {f.name for f in dataclasses.fields(models.MODELS[name])} - {"parent", "name"}
    for key, value in _get(config, "model").items():
        if key == "pretrained":   # a run field (weights to start from), not a module field
            if not isinstance(value, str):
                _fail("model.pretrained", value, "must be a path, a hub name or ''")
        if key in RUN_MODEL_FIELDS:
            continue
        if key not in known or key == "num_classes":
            _fail(f"model.{key}", value, f"is not a field of model {name!r}; "
                  f"fields: {sorted(known - {'num_classes'})}")
        if isinstance(value, (tuple, list)) and not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
            _fail(f"model.{key}", tuple(value), "every size must be an integer ≥ 1")


def validate_config(config) -> None:
    """Raise ``ConfigError`` naming the first bad field and its allowed values."""
    _int(config, "seed", lo=0)
    _choice(config, "data.name", federated.DATASETS)
    num_clients = _int(config, "data.num_clients")
    _positive(config, "data.alpha")
    tf = _get(config, "data.test_fraction")
    if isinstance(tf, bool) or not isinstance(tf, (int, float)) or not 0 < tf < 1:
        _fail("data.test_fraction", tf, "must be in (0, 1)")
    _int(config, "data.min_client_size", lo=2)
    data = _get(config, "data")
    if "partition" in data:
        _choice(config, "data.partition", federated.PARTITIONS)
    for field in ("n_train", "n_test", "classes_per_client"):
        if field in data:
            _int(config, f"data.{field}")
    if "mock_examples" in data:
        _int(config, "data.mock_examples", lo=0)
    if "download" in data and not isinstance(data.download, bool):
        _fail("data.download", data.download, "must be True or False")
    if data.get("data_dir") is not None and not isinstance(data.data_dir, str):
        _fail("data.data_dir", data.data_dir, "must be a path or None")
    if data.name in federated.FILE_DATASETS and not data.get("data_dir"):
        _fail("data.data_dir", data.get("data_dir"), f"dataset {data.name!r} needs " + (
            "a directory holding train/<class>/ and test/<class>/ image folders"
            if data.name == "image_folder" else
            "the path of an .npz file holding x_train, y_train, x_test, y_test"))
    for field in ("mean", "std"):   # per-channel normalisation; None = the data's default
        v = data.get(field)
        if v is not None and (not isinstance(v, (tuple, list)) or not v or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                and (field == "mean" or s > 0) for s in v)):
            _fail(f"data.{field}", v, "must be None or a non-empty tuple of finite numbers, "
                  "one per channel" + (", each > 0" if field == "std" else ""))
    if data.get("mean") is not None and data.get("std") is not None \
            and len(data.mean) != len(data.std):
        _fail("data.std", tuple(data.std), f"must have as many values as data.mean = "
              f"{tuple(data.mean)!r}")
    if data.get("augment") is not None and not isinstance(data.augment, bool):
        _fail("data.augment", data.augment, "must be True, False or None (the dataset's "
              "default)")
    if "tokenizer" in data and (not isinstance(data.tokenizer, str) or not data.tokenizer):
        _fail("data.tokenizer", data.tokenizer, "must be 'bpe', a tokenizer.json path or a "
              "Hugging Face hub name")
    if "vocab_size" in data:
        _int(config, "data.vocab_size", lo=text.MIN_VOCAB_SIZE)   # 256 bytes + 5 specials
    if "max_length" in data:
        _int(config, "data.max_length", lo=text.MIN_MAX_LENGTH)

    caps = _get(config, "capacities")
    if not isinstance(caps, (tuple, list)) or not caps:
        _fail("capacities", caps, "must be a non-empty sequence of ratios in (0, 1]")
    for c in caps:
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
            _fail("capacities", tuple(caps), f"every ratio must be in (0, 1]; {c!r} is not")
    if len(set(caps)) != len(caps):
        _fail("capacities", tuple(caps), "ratios must be distinct")
    labels = [evaluate.capacity_label(c) for c in caps]
    if len(set(labels)) != len(labels):
        _fail("capacities", tuple(caps), f"ratios must have distinct labels, got {labels}")
    if len(caps) > num_clients:
        _fail("capacities", tuple(caps),
              f"more capacity levels than clients (data.num_clients = {num_clients})")

    method = _choice(config, "method", policies.POLICIES)
    # Every method section present is checked, used by this run or not.
    if method == "fiarse" or "fiarse" in config:
        _choice(config, "fiarse.scope", masks.SCOPES)
        _choice(config, "fiarse.gradient", fiarse.GRADIENTS)
    if method == "fiarse_neuron" or "fiarse_neuron" in config:
        _choice(config, "fiarse_neuron.scope", masks.SCOPES)
    if "heterofl" in config and not isinstance(config.heterofl.get("scaler", False), bool):
        _fail("heterofl.scaler", config.heterofl.scaler, "must be True or False")
    for name in ("fiarse_neuron", "heterofl", "fedrolex", "fed_dropout", "fedavg_smallest"):
        if name in config and "budget" in config[name]:
            _choice(config, f"{name}.budget", policies.structured.BUDGETS)
    if (method == "heterofl" and config.heterofl.get("scaler", False)
            and not getattr(models.MODELS.get(config.model.get("name")), "normalized", False)):
        _fail("heterofl.scaler", True, f"model {config.model.get('name')!r} has no "
              "normalisation layer to absorb HeteroFL's 1/r output scale (levels sharing a "
              "unit then train it at scales 1, 4, 16, … and diverge); set it False")
    if "scalefl" in config:
        try:
            policies.scalefl.check_options(**{k: config.scalefl[k] for k in (
                "depth_exponent", "kd_weight", "temperature") if k in config.scalefl})
        except ValueError as e:
            raise ConfigError(f"config.scalefl.{e}") from None
    _check_model(config)
    if method == "scalefl":   # early exits on an MLP (≥ 2 hidden layers) or ResNet (≥ 2 stages)
        m = _get(config, "model")
        depth_field = {"mlp": "hidden_sizes", "resnet18": "widths"}.get(m.name)
        layers = (tuple(m.get(depth_field, getattr(models.MODELS[m.name], depth_field)))
                  if depth_field else ())
        if depth_field is None or m.get("early_exits", False) is not True or len(layers) < 2:
            _fail("model", f"{m.name} early_exits={m.get('early_exits', False)}"
                  + (f" {depth_field}={layers}" if depth_field else ""), policies.scalefl.NEEDS)

    _int(config, "num_rounds")
    _int(config, "clients_per_round", hi=num_clients)
    _choice(config, "client.optimizer", OPTIMIZERS)
    _positive(config, "client.learning_rate")
    if "betas" in config.client:
        b = _get(config, "client.betas")
        if not (isinstance(b, (tuple, list)) and len(b) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1
                for v in b)):
            _fail("client.betas", b, "must be two numbers in [0, 1) (AdamW's β1, β2)")
    if "weight_decay" in config.client:
        _number(config, "client.weight_decay", 0.0, math.inf, hi_open=True)
    _int(config, "client.local_steps")
    if "local_epochs" in config.client:
        _number(config, "client.local_epochs", 0.0, 1e6)
    _int(config, "client.batch_size")
    _positive(config, "server.learning_rate")
    _check_robustness(config, method, num_clients, len(caps))
    _choice(config, "engine.strategy", engine.STRATEGIES)
    chunk = _get(config, "engine.clients_per_chunk")
    if isinstance(chunk, str) and chunk != "auto":
        _fail("engine.clients_per_chunk", chunk, "must be an integer ≥ 0 or 'auto'")
    if chunk != "auto":
        _int(config, "engine.clients_per_chunk", lo=0)
    if "memory_budget_gb" in config.engine:
        _number(config, "engine.memory_budget_gb", 0.0, math.inf, hi_open=True)
    _choice(config, "engine.dtype", ("float32", "bfloat16"))
    if "reduce" in config.engine and _choice(config, "engine.reduce", REDUCE_MODES) == "stream":
        blocker = stream_blocker(config)
        if blocker:
            _fail("engine.reduce", "stream", f"cannot be used: {blocker} (use 'auto' or "
                  "'stack')")
    _bool(config, "profile")
    _int(config, "eval_every")
    if "eval" in config:
        _int(config, "eval.batch_size", lo=0)
    _int(config, "checkpoint_every", lo=0)
    _int(config, "keep_checkpoints", lo=1)
    _bool(config, "tensorboard")


#: ``config.engine.reduce``: stream the server's inputs when the rule allows (``auto``),
#: always (``stream``, refused when it cannot) or never (``stack``).
REDUCE_MODES = ("auto", "stack", "stream")


def stream_blocker(config) -> str | None:
    """Why this config's server needs every client's update at once (None: it can stream)."""
    validate = config.server.validate
    kind = config.attack.kind   # label_flip acts on the data, not on the updates
    return server_round.stream_blocker(
        aggregator=config.server.aggregator,
        attack=kind if kind in attacks.KINDS else "none",
        z_threshold=config.server.z_threshold if validate else None,
        cosine_threshold=config.server.cosine_threshold if validate else None)


def _check_robustness(config, method: str, num_clients: int, num_levels: int) -> None:
    """server.aggregator and its options, update validation, attack.*, dp.*."""
    agg = _choice(config, "server.aggregator", aggregators.AGGREGATORS)
    _number(config, "server.trimmed_mean.beta", 0.0, 0.5, hi_open=True)
    _positive(config, "server.norm_bounded.max_norm")
    f = _int(config, "server.multi_krum.num_byzantine", lo=0)
    if agg == "multi_krum" and config.clients_per_round <= 2 * f + 2:
        _fail("server.multi_krum.num_byzantine", f, f"multi-Krum needs clients_per_round "
              f"({config.clients_per_round}) > 2·{f} + 2")
    _bool(config, "server.validate")
    _positive(config, "server.z_threshold")
    _number(config, "server.cosine_threshold", -1.0, 1.0)

    kind = _choice(config, "attack.kind", ATTACK_KINDS)
    fraction = _number(config, "attack.fraction", 0.0, 1.0, hi_open=True)
    _number(config, "attack.scale", -math.inf, math.inf, lo_open=True, hi_open=True)
    _number(config, "attack.noise_std", 0.0, math.inf, hi_open=True)
    levels = _get(config, "attack.levels")
    if not isinstance(levels, (tuple, list)) or not all(
            isinstance(l, int) and not isinstance(l, bool) and 0 <= l < num_levels for l in levels):
        _fail("attack.levels", levels, f"must be level indices in [0, {num_levels - 1}]")
    if kind != "none" and math.floor(fraction * num_clients + 0.5) == 0:
        _fail("attack.fraction", fraction, f"gives no attacker among {num_clients} clients "
              f"with attack.kind = {kind!r}")

    sigma = _number(config, "dp.noise_multiplier", 0.0, math.inf, hi_open=True)
    eps = _number(config, "dp.target_epsilon", 0.0, math.inf, hi_open=True)
    _positive(config, "dp.clip_norm")
    _number(config, "dp.delta", 0.0, 1.0, lo_open=True, hi_open=True)
    _choice(config, "dp.accountant", privacy.ACCOUNTANTS)
    if sigma > 0 and eps > 0:
        _fail("dp.target_epsilon", eps, "give dp.noise_multiplier or dp.target_epsilon, not both")
    if (sigma > 0 or eps > 0) and agg != "mean":
        _fail("server.aggregator", agg, "differential privacy is DP-FedAvg: it needs 'mean'")
    if (sigma > 0 or eps > 0) and config.server.validate:
        _fail("server.validate", True, "the norm and direction screens accept a client by the "
              "other clients' updates, which voids DP's sensitivity bound; set it False with "
              "dp.* (non-finite updates are rejected either way)")
    if (sigma > 0 or eps > 0) and method == "fed_dropout":
        _fail("method", method, "differential privacy needs per-level masks; fed_dropout's "
              "are random per client")
