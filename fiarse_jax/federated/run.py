"""What rounds are built from: a ``Run`` (data, model, policy and their functions) and
its typed ``Options``.

The config is parsed into ``Options`` once, at the experiment's boundary
(``experiment.config.round_options``); nothing in this package or below reads a config.
Each section's options class lives beside the code that uses it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np

from fiarse_jax.core import rng
from fiarse_jax.federated.client import ClientOptions
from fiarse_jax.federated.engine import EngineOptions
from fiarse_jax.federated.evaluate import EvalOptions
from fiarse_jax.federated.server_round import ServerOptions
from fiarse_jax.policies import MaskPolicy
from fiarse_jax.robust.attacks import AttackOptions
from fiarse_jax.robust.privacy import DPOptions


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which clients train when, and where the training loop stops on the host (defaults:
    configs/default.py's).

    Attributes:
      seed: the run's seed (clients sampled per round from it: ``rng.sample_clients``).
      num_rounds: rounds in the whole run.
      num_clients: clients in the federation.
      clients_per_round: clients sampled in each round.
      eval_every: rounds between evaluations (0: none but the last).
      checkpoint_every: rounds between checkpoints (0: none).
      rounds_per_program: the most rounds compiled together (0: no limit of its own;
        ``config.engine.rounds_per_program``).
    """

    seed: int = 0
    num_rounds: int = 200
    num_clients: int = 50
    clients_per_round: int = 10
    eval_every: int = 20
    checkpoint_every: int = 50
    rounds_per_program: int = 0


class Options(NamedTuple):
    """Every typed option a run's rounds and evaluation read, one class per section
    (``Options()``: configs/default.py's, tested)."""

    schedule: Schedule = Schedule()
    client: ClientOptions = ClientOptions()
    engine: EngineOptions = EngineOptions()
    server: ServerOptions = ServerOptions()
    dp: DPOptions = DPOptions()
    attack: AttackOptions = AttackOptions()
    eval: EvalOptions = EvalOptions()


class Run(NamedTuple):
    """Everything a run is built from, derived from its config alone (no state):
    ``experiment.build.build_run``."""

    options: Options
    capacities: tuple[float, ...]
    data: Any                       # FederatedData
    model: Any
    init_params: Any
    train_key: jax.Array
    unit_groups: Any
    policy: MaskPolicy
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
