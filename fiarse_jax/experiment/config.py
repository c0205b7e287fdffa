"""The boundary between the config and the library: ``validate_config`` stops every bad
value before any work, in one line; ``round_options`` then parses the config once into the
typed ``Options`` that everything below the experiment layer reads (no module there sees a
``ConfigDict``)."""
from __future__ import annotations

import dataclasses
import math
import types
from typing import Any

from fiarse_jax import models, policies
from fiarse_jax.core.capacities import capacity_label
from fiarse_jax.data import check_data_config
from fiarse_jax.data.federation import GLOBAL_ORDERS
from fiarse_jax.federated import algorithm, engine, evaluate, server_round, xla
from fiarse_jax.federated.client import ClientOptions
from fiarse_jax.federated.engine import EngineOptions
from fiarse_jax.federated.evaluate import EvalOptions
from fiarse_jax.federated.run import Options, Schedule
from fiarse_jax.federated.server_round import ServerOptions
from fiarse_jax.robust import aggregators, attacks, privacy, validation
from fiarse_jax.robust.attacks import AttackOptions
from fiarse_jax.robust.privacy import DPOptions
from fiarse_jax.utils.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
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


def _ask(check, *args):
    """``check(*args)`` (a registry's validation), its ``ValueError`` as a ``ConfigError``."""
    try:
        return check(*args)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None


def validate_config(config) -> None:
    """Raise ``ConfigError`` naming the first bad field and its allowed values.

    The checks run in this order (the first bad field is the one named): the seed, the
    data, the capacities, the method and model, the clients' training, the server's
    robustness and DP, the engine, and the loop's evaluations and outputs."""
    _int(config, "seed", lo=0)
    num_clients = _check_data(config)
    num_levels = _check_capacities(config, num_clients)
    method = _check_method_and_model(config)
    _check_training(config, num_clients)
    _check_robustness(config, method, num_clients, num_levels)
    _check_engine(config)
    _check_loop(config)


def _check_data(config) -> int:
    """data.*: the federation's fields, then the dataset's own; returns num_clients."""
    num_clients = _int(config, "data.num_clients")
    _positive(config, "data.alpha")
    tf = _get(config, "data.test_fraction")
    if isinstance(tf, bool) or not isinstance(tf, (int, float)) or not 0 < tf < 1:
        _fail("data.test_fraction", tf, "must be in (0, 1)")
    _int(config, "data.min_client_size", lo=2)
    _ask(check_data_config, _get(config, "data"))   # name, partition, the dataset's own fields
    return num_clients


def _check_capacities(config, num_clients: int) -> int:
    """capacities: distinct ratios in (0, 1] with distinct labels, no more levels than
    clients; returns the number of levels."""
    caps = _get(config, "capacities")
    if not isinstance(caps, (tuple, list)) or not caps:
        _fail("capacities", caps, "must be a non-empty sequence of ratios in (0, 1]")
    for c in caps:
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
            _fail("capacities", tuple(caps), f"every ratio must be in (0, 1]; {c!r} is not")
    if len(set(caps)) != len(caps):
        _fail("capacities", tuple(caps), "ratios must be distinct")
    labels = [capacity_label(c) for c in caps]
    if len(set(labels)) != len(labels):
        _fail("capacities", tuple(caps), f"ratios must have distinct labels, got {labels}")
    if len(caps) > num_clients:
        _fail("capacities", tuple(caps),
              f"more capacity levels than clients (data.num_clients = {num_clients})")
    return len(caps)


def _check_method_and_model(config) -> str:
    """method, model.* and every method section present; returns the method."""
    method = _choice(config, "method", policies.METHODS)
    model_cls = _ask(models.check_model_config, _get(config, "model"))
    # Every method section present is checked, used by this run or not; the run's own
    # method also against the model (e.g. early exits, a normalisation layer).
    for name in policies.METHODS:
        if name == method or name in config:
            _ask(policies.check_method_config, name, config.get(name),
                 config.model if name == method else None, model_cls)
    return method


def _check_training(config, num_clients: int) -> None:
    """num_rounds, clients_per_round, client.* and server.learning_rate."""
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
    _int(config, "client.local_steps", hi=MAX_LOCAL_STEPS)
    if "local_epochs" in config.client:
        _number(config, "client.local_epochs", 0.0, 1e6)
    _int(config, "client.batch_size")
    _positive(config, "server.learning_rate")


def _check_engine(config) -> None:
    """engine.*: strategy, chunk, memory budget, dtype, XLA, rounds per program, reduce."""
    _choice(config, "engine.strategy", engine.STRATEGIES)
    chunk = _get(config, "engine.clients_per_chunk")
    if isinstance(chunk, str) and chunk != "auto":
        _fail("engine.clients_per_chunk", chunk, "must be an integer ≥ 0 or 'auto'")
    if chunk != "auto":
        _int(config, "engine.clients_per_chunk", lo=0)
    if "memory_budget_gb" in config.engine:
        _number(config, "engine.memory_budget_gb", 0.0, math.inf, hi_open=True)
    _choice(config, "engine.dtype", ("float32", "bfloat16"))
    if "xla" in config.engine:
        _choice(config, "engine.xla", xla.XLA_SETTINGS)
    if "rounds_per_program" in config.engine:
        _int(config, "engine.rounds_per_program", lo=0)
    if "reduce" in config.engine and _choice(config, "engine.reduce", REDUCE_MODES) == "stream":
        blocker = stream_blocker(config)
        if blocker:
            _fail("engine.reduce", "stream", f"cannot be used: {blocker} (use 'auto' or "
                  "'stack')")


def _check_loop(config) -> None:
    """The training loop's profile, evaluations (eval_every, eval.*), checkpoints and
    TensorBoard switch."""
    _bool(config, "profile")
    _int(config, "eval_every")
    if "eval" in config:
        _int(config, "eval.batch_size", lo=0)
        if "levels" in config.eval:
            _choice(config, "eval.levels", evaluate.LEVEL_MODES)
        if "global_order" in config.eval:
            _choice(config, "eval.global_order", GLOBAL_ORDERS)
    _int(config, "checkpoint_every", lo=0)
    _int(config, "keep_checkpoints", lo=1)
    _bool(config, "tensorboard")


#: More local steps than this per round is a typo, not an experiment (the paper: K = 100).
MAX_LOCAL_STEPS = 1_000_000


#: ``config.engine.reduce``: stream the server's inputs when the rule allows (``auto``),
#: always (``stream``, refused when it cannot) or never (``stack``).
REDUCE_MODES = ("auto", "stack", "stream")


def stream_blocker(config) -> str | None:
    """Why this config's server needs every client's update at once (None: it can stream)."""
    return algorithm.stream_blocker(server_options(config), attack_options(config))


def _check_robustness(config, method: str, num_clients: int, num_levels: int) -> None:
    """server.aggregator and its options, update validation, attack.*, dp.*."""
    agg = _choice(config, "server.aggregator", aggregators.AGGREGATORS)
    _ask(aggregators.check_options, agg, aggregators.AGGREGATORS[agg],
         dict(config.server.get(agg, {})))   # the rule's own options: keys and types
    _number(config, "server.trimmed_mean.beta", 0.0, 0.5, hi_open=True)
    _positive(config, "server.norm_bounded.max_norm")
    f = _int(config, "server.multi_krum.num_byzantine", lo=0)
    if agg == "multi_krum" and config.clients_per_round <= 2 * f + 2:
        _fail("server.multi_krum.num_byzantine", f, f"multi-Krum needs clients_per_round "
              f"({config.clients_per_round}) > 2·{f} + 2")
    _bool(config, "server.validate")
    _positive(config, "server.z_threshold")
    _number(config, "server.cosine_threshold", -1.0, 1.0)
    if "screen" in config.server:
        _choice(config, "server.screen", validation.SCREENS)
    if "direction_action" in config.server:
        _choice(config, "server.direction_action", server_round.DIRECTION_ACTIONS)
    if "exclude_after_flags" in config.server:
        _int(config, "server.exclude_after_flags", lo=0)
    if (config.server.validate and config.server.get("direction_action") == "flag"
            and not config.server.get("exclude_after_flags", 0)):
        _fail("server.direction_action", "flag", "only feeds reputation: with "
              "server.exclude_after_flags = 0 the direction test would do nothing")

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
    if (sigma > 0 or eps > 0) and config.server.get("exclude_after_flags", 0) > 0:
        _fail("server.exclude_after_flags", config.server.exclude_after_flags, "reputation "
              "excludes a client by what the server saw of its earlier updates, outside DP's "
              "accounting; set it 0 with dp.*")
    if (sigma > 0 or eps > 0) and policies.METHODS[method].per_client_random_masks:
        _fail("method", method, f"differential privacy needs per-level masks; {method}'s "
              "are random per client")


# --------------------------------------------------------------- the typed options (parse once)

def _section(cls, section, **fields):
    """``cls`` from the fields of config section ``section`` that it declares (a field the
    section lacks keeps the class default), ``fields`` overriding."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{**{n: section[n] for n in names if n in section}, **fields})


def server_options(config) -> ServerOptions:
    """``config.server`` with its aggregator's own options (``server.<aggregator>``)."""
    s = config.server
    return _section(ServerOptions, s, aggregator_options=types.MappingProxyType(
        dict(s.get(s.aggregator, {}))))


def attack_options(config) -> AttackOptions:
    return _section(AttackOptions, config.attack, levels=tuple(config.attack.get("levels", ())))


def eval_batch_size(config) -> int:
    """``eval.batch_size``, or ``client.batch_size`` when 0 or absent (the authors score
    every test set in batches of their client batch size)."""
    b = config.get("eval", {}).get("batch_size", 0)
    return int(b) if b else int(config.client.batch_size)


def round_options(config) -> Options:
    """The typed options of a validated ``config`` (``validate_config``): what the rounds,
    the server, DP, the attack and the evaluation read, one frozen class per section.

    Args:
      config: the run's ``ConfigDict`` (configs/default.py's fields).

    Returns:
      ``Options``: ``schedule``, ``client``, ``engine``, ``server``, ``dp``, ``attack``,
      ``eval``.
    """
    client = config.client
    return Options(
        schedule=_section(Schedule, config, num_clients=config.data.num_clients,
                          rounds_per_program=config.engine.get("rounds_per_program", 0)),
        client=_section(ClientOptions, client,
                        betas=tuple(float(b) for b in client.get("betas", (0.9, 0.999)))),
        engine=_section(EngineOptions, config.engine),
        server=server_options(config),
        dp=_section(DPOptions, config.dp),
        attack=attack_options(config),
        eval=EvalOptions(batch_size=eval_batch_size(config),
                         levels=config.get("eval", {}).get("levels", "auto")))
