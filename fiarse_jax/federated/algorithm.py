"""The federated algorithm as a builder: ``build_algorithm(run) -> Algorithm``.

As fedjax's ``FederatedAlgorithm``, an algorithm is a pair of functions, and the loop
that calls them (``train.train_and_evaluate``) knows nothing of what is inside:

* ``init(params, rounds_done=0, dp_segments=(), planned_rounds=None) -> ServerState``:
  the state a run starts (or resumes) from;
* ``apply(state, client_ids) -> (state, RoundStats)``: one round with these clients;
* ``apply_rounds(state, [client_ids, ...]) -> (state, [RoundStats, ...])``: consecutive
  rounds, compiled as one program where the round allows it (streamed server inputs, the
  loop or vmap strategy, one process): sampling's keys, thresholds, client training and
  the server step of up to ``max_block(schedule)`` rounds (``rounds_per_program``;
  default: up to the next evaluation or checkpoint) run with no host sync in between.

``ServerState`` holds what persists across rounds: the global params, the rounds done,
DP's σ for the rounds ahead and its history (ε composes over it), and each client's
screening record (``reputation``). Everything else a round uses is a pure function of
(seed, round) (``rng``), so a checkpoint of the params, the round, the σ history (σ
follows from it and the options) and the record resumes a run exactly.

Inside ``apply``: the policy prepares every level's extraction from the global model
(``policy.prepare``: one threshold pass for FIARSE), each client gets its spec and rows, the
clients train with the chosen strategy (``engine``), and the server step aggregates over
holders. Its internals: streamed sums (the server's inputs summed while the clients
train) or stacked deltas (robust rules, screens and simulated attacks need all updates
at once, ``stream_blocker``), update validation, DP-FedAvg's clipping, noise and
accounting, the auto-sized client chunk, and the multi-process glue.
"""
from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fiarse_jax.core import rng
from fiarse_jax.federated import client as client_lib
from fiarse_jax.federated import devices, engine, memory, server_round, xla
from fiarse_jax.federated.run import Options, Run, Schedule
from fiarse_jax.federated.server_round import ServerOptions
from fiarse_jax.robust import attacks, privacy, reputation, validation
from fiarse_jax.robust.attacks import AttackOptions
from fiarse_jax.robust.privacy import DPOptions
from fiarse_jax.utils.errors import ConfigError

#: A mean client loss above this many times chance (ln K) is a diverged run, not a slow one.
DIVERGED_LOSS_FACTOR = 1000.0


def divergence(train_loss: float, reason: np.ndarray, in_round: np.ndarray,
               num_classes: int) -> str | None:
    """Why a round counts as diverged (None: it does not): a non-finite mean client loss;
    one above ``DIVERGED_LOSS_FACTOR`` × ln K (e.g. lr 1e6 on the default reaches ~8e4
    while chance is 2.3); or every honest client's update non-finite (the server rejects
    them all, and the run would go on unchanged at chance)."""
    if not np.isfinite(train_loss):
        return f"mean client loss {train_loss}"
    bound = DIVERGED_LOSS_FACTOR * math.log(max(num_classes, 2))
    if train_loss > bound:
        return (f"mean client loss {train_loss:.4g}, over {DIVERGED_LOSS_FACTOR:g}× chance's "
                f"ln {num_classes} = {math.log(max(num_classes, 2)):.2f}")
    honest = ~np.asarray(in_round, bool)
    non_finite = np.asarray(reason) == validation.REASONS.index("non_finite")
    if honest.any() and non_finite[honest].all():
        return "every client's update was non-finite"
    return None


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss became NaN); the message says why."""


class ServerState(NamedTuple):
    """What persists across rounds (see the module docstring)."""

    params: Any               # the global model (replicated on every device when sharded)
    round: int                # rounds done
    sigma: float              # DP's noise multiplier for the rounds ahead (0: no DP)
    dp_segments: tuple        # ((rounds, σ), ...): the σ history, for DP accounting
    reputation: np.ndarray    # int32 [num_clients, 2]: rounds screened, rounds flagged


class RoundStats(NamedTuple):
    """One round's numbers, on the host (the round's one wait for the device)."""

    train_loss: float         # the mean client loss
    norms: np.ndarray         # L2 norms of the accepted updates
    accepted: np.ndarray      # bool per client
    reason: np.ndarray        # int per client: index into ``validation.REASONS``
    attackers: int            # simulated attackers among the round's clients
    honest_rejected: int      # updates of honest clients the server refused
    excluded_total: int | None  # clients excluded by reputation so far (None: it is off)
    dp_epsilon: float | None  # ε spent so far (None without DP)
    seconds: float            # the round's wall time, up to its results on the host


class Algorithm(NamedTuple):
    """``init``, ``apply`` and ``apply_rounds`` (module docstring) plus what the run
    summary reports."""

    init: Callable[..., ServerState]
    apply: Callable[[ServerState, np.ndarray], tuple[ServerState, RoundStats]]
    apply_rounds: Callable[[ServerState, Sequence[np.ndarray]],
                           tuple[ServerState, list[RoundStats]]]
    strategy: str             # engine strategy: loop, vmap, sharded
    clients_per_chunk: int    # clients trained at once per device (0: all; loop: 1)
    streaming: bool           # whether the server's inputs are streamed
    rounds_per_program: int   # rounds compiled together at most (1: a program per round)


def build_algorithm(run: Run) -> Algorithm:
    """The algorithm of ``run.options`` (server rule, DP, attack, engine) on ``run``:
    wiring over its pieces, the clients' training (``client_fns``), the engine
    strategy, the servers by σ (``ServerCache``), the round inputs
    (``make_round_inputs``), the client chunk (``client_chunk``) and the rounds over them
    (``_Rounds``: ``init``, ``apply``, the block program, ``conclude``).

    Args:
      run: what the rounds train (``experiment.build.build_run``), with its ``Options``.

    Returns:
      The ``Algorithm``: ``init``, ``apply``, ``apply_rounds`` and what it chose.

    Raises:
      ConfigError: options this machine cannot run (a strategy across processes, an
        ``"auto"`` chunk that fits nowhere, an ε target already spent).
    """
    o = run.options
    fns = client_fns(run)
    strategy = engine.resolve_strategy(o.engine.strategy)
    multi = jax.process_count() > 1
    if multi and strategy != "sharded":
        raise ConfigError(f"config.engine.strategy = {o.engine.strategy!r}: across "
                          f"{jax.process_count()} processes only 'sharded' runs")
    streaming = stream_updates(o)
    sigma0 = noise_multiplier(o.dp, o.schedule)   # a resume may recalibrate it (init)
    servers = ServerCache(o.server, o.dp, streaming, sigma0)   # before any file is written
    round_inputs = make_round_inputs(run)
    chunk = client_chunk(run, fns, servers(sigma0)[0], strategy, round_inputs)
    fused = (streaming and strategy in ("loop", "vmap") and not multi
             and max_block(o.schedule) > 1)
    rounds = _Rounds(run, fns, servers, round_inputs, strategy=strategy, chunk=chunk,
                     multi=multi, sigma0=sigma0,
                     capacity=max_block(o.schedule) if fused else 1)
    return Algorithm(rounds.init, rounds.apply, rounds.apply_rounds, strategy,
                     1 if strategy == "loop" else chunk, streaming, rounds.capacity)


def client_fns(run: Run) -> client_lib.ClientFns:
    """The clients' local training (``client.make_client_fns``) as the client options and
    the engine's dtype set it, on ``run``'s loss, policy and data."""
    sizes, c = run.data.train_sizes, run.options.client
    return client_lib.make_client_fns(run.loss_fn, run.policy, client_lib.make_optimizer(c),
                                      num_steps=client_lib.local_steps(c, sizes),
                                      local_epochs=c.local_epochs, batch_size=c.batch_size,
                                      augment=run.train_transform,
                                      min_rows=int(np.min(sizes)),
                                      compute_dtype=client_lib.COMPUTE_DTYPES[
                                          run.options.engine.dtype])


class RoundInputs(NamedTuple):
    """What a round's clients train from (``make_round_inputs``)."""

    streams: dict             # the round's named key streams (``rng.round_streams``)
    round_state: Any          # the policy's state for the round (``policy.prepare``)
    keys: jax.Array           # one key per client
    specs: Any                # each client's sub-model spec (leading client axis)
    batch: Any                # each client's rows of the training data (leading client axis)


def make_round_inputs(run: Run) -> Callable[..., RoundInputs]:
    """``round_inputs(view, rnd, ids, train=run.data.train) -> RoundInputs``: round
    ``rnd``'s named key streams (``rng``), the policy's state prepared on ``view``, and the
    keys, specs (drawn with each client's ``spec`` stream) and rows of ``train`` of clients
    ``ids``. Traceable: inside a block of rounds ``rnd``, ``ids`` and ``train`` are the
    program's."""
    client_specs = jax.jit(jax.vmap(run.policy.client_spec, in_axes=(None, 0, 0)))
    levels_of = jnp.asarray(run.assignment)

    def round_inputs(view, rnd, ids, train=run.data.train) -> RoundInputs:
        ids = jnp.asarray(ids)
        streams = rng.round_streams(run.train_key, rnd)
        round_state = run.prepare(view, rnd, streams["policy"])
        keys = rng.client_keys(streams["clients"], ids)
        spec_keys = jax.vmap(lambda k: rng.client_streams(k)["spec"])(keys)
        specs = client_specs(round_state, levels_of[ids], spec_keys)
        batch = jax.tree_util.tree_map(lambda a: a[ids], train)
        return RoundInputs(streams, round_state, keys, specs, batch)

    return round_inputs


class ServerCache:
    """The server at each DP noise σ, built on first use: ``cache(σ)`` is
    ``_server``'s (the engine's ``reduce`` hook or None, streamed server or None, stacked
    server step). σ changes only where a resume recalibrates it (``noise_multiplier``), so
    a run holds one or two; the first, ``sigma0``'s, is built at once (a bad server rule
    fails before any file is written)."""

    def __init__(self, server: ServerOptions, dp: DPOptions, streaming: bool, sigma0: float):
        self._server, self._dp, self.streaming = server, dp, streaming
        self._servers: dict[float, tuple] = {}
        self(sigma0)

    def __call__(self, sigma: float) -> tuple:
        if sigma not in self._servers:
            self._servers[sigma] = _server(self._server, self._dp.clip_norm, sigma,
                                           self.streaming)
        return self._servers[sigma]


def client_chunk(run: Run, fns: client_lib.ClientFns, reduce, strategy: str,
                 round_inputs: Callable[..., RoundInputs]) -> int:
    """The engine's ``clients_per_chunk``, where ``"auto"`` is decided by ``auto_chunk`` on
    round 0's inputs (every round has the same shapes: round 0's decides)."""
    chunk = run.options.engine.clients_per_chunk
    if chunk != "auto":
        return chunk
    ids0 = client_schedule(run.options.schedule, 0, 1)[0]
    return auto_chunk(run.options.engine, fns, reduce, strategy,
                      lambda: (run.init_params, *round_inputs(run.init_params, 0, ids0)[2:]))


def make_attack(attack: AttackOptions) -> Callable | None:
    """The simulated attack on the stacked updates (``attacks.attack_updates``, jitted), or
    None where ``attack.kind`` does not act on updates (``none``, ``label_flip``)."""
    if attack.kind not in attacks.KINDS or attack.kind == "none":
        return None
    return jax.jit(functools.partial(attacks.attack_updates, attack.kind, scale=attack.scale,
                                     noise_std=attack.noise_std))


class _Rounds:
    """``Algorithm``'s ``init``, ``apply`` and ``apply_rounds`` over the pieces
    ``build_algorithm`` wires: ``apply`` runs one round (streamed or stacked server inputs),
    ``apply_rounds`` up to ``capacity`` rounds as one program (``rounds_program``), and both
    finish each round on the host with ``conclude``."""

    def __init__(self, run: Run, fns: client_lib.ClientFns, servers: ServerCache,
                 round_inputs: Callable[..., RoundInputs], *, strategy: str, chunk: int,
                 multi: bool, sigma0: float, capacity: int):
        self.run, self.fns, self.servers = run, fns, servers
        self.round_inputs, self.strategy, self.chunk = round_inputs, strategy, chunk
        self.sigma0, self.capacity = sigma0, capacity   # capacity 1: no blocks of rounds
        self.streaming = servers.streaming
        # Across processes (jax.distributed) every process runs the same rounds on the same
        # inputs; arrays the server step reads are global.
        self.glob = devices.replicate if multi else (lambda x: x)
        self.rules = HostRules.of(run)
        self.attack = make_attack(run.options.attack)
        self.divisor = make_divisor(run.policy, run.capacities, run.assignment,
                                    sampling_rate(run.options.schedule))
        self.xla = run.options.engine.xla
        self._runners: dict[float, tuple] = {}
        self._blocks: dict[float, Callable] = {}

    def init(self, params, rounds_done: int = 0, dp_segments: Sequence = (),
             planned_rounds: int | None = None, record=None) -> ServerState:
        """The state after ``rounds_done`` rounds with these params (a fresh run: 0);
        ``dp_segments``/``planned_rounds``: the σ history and ``num_rounds`` of the
        checkpoint resumed from (DP recalibrates σ when ``num_rounds`` changed);
        ``record``: its screening record (default: empty)."""
        o, sigma0 = self.run.options, self.sigma0
        spent = tuple((int(n), float(s)) for n, s in dp_segments)
        sigma = (noise_multiplier(o.dp, o.schedule, spent, planned_rounds)
                 if sigma0 > 0 and spent else sigma0)
        if sigma != sigma0 and jax.process_index() == 0:
            print(f"DP: σ = {sigma:.4g} for rounds {rounds_done + 1}–{o.schedule.num_rounds} "
                  f"(σ history {[list(s) for s in spent]}), so that the whole run spends ε = "
                  f"{o.dp.target_epsilon}", flush=True)
        if self.strategy == "sharded":
            params = devices.replicate(params)   # on every device, beside the sharded deltas
        n = o.schedule.num_clients
        record = (reputation.fresh(n) if record is None
                  else np.asarray(record, np.int32).reshape(n, 2))
        return ServerState(params, rounds_done, sigma, spent, record)

    def runner_at(self, sigma: float) -> tuple:
        """(streamed server or None, stacked server step, client runner) at DP noise σ."""
        if sigma not in self._runners:
            reduce, stream, step = self.servers(sigma)
            self._runners[sigma] = (stream, step, engine.make_round_runner(
                self.fns, self.strategy, clients_per_chunk=self.chunk, reduce=reduce,
                xla=self.xla))
        return self._runners[sigma]

    def apply(self, state: ServerState, ids: np.ndarray) -> tuple[ServerState, RoundStats]:
        """Round ``state.round`` with clients ``ids`` (sorted ints); donates
        ``state.params``."""
        t0, sigma = time.time(), state.sigma
        view = devices.local_view(state.params)
        inputs = self.round_inputs(view, state.round, ids)
        server_key = self.glob(inputs.streams["server"])
        divisor = self.glob(self.divisor(view, inputs.round_state) if sigma > 0 else 0.0)
        server = self._streamed_round if self.streaming else self._stacked_round
        params, losses, info, norms = server(state, ids, view, inputs, server_key, divisor)
        losses = devices.to_host(losses)   # the round's one wait
        return conclude(self.rules, state, params, ids, losses, devices.to_host(info["accepted"]),
                        devices.to_host(info["reason"]), devices.to_host(norms), time.time() - t0)

    def _streamed_round(self, state: ServerState, ids, view, inputs: RoundInputs, server_key,
                        divisor) -> tuple:
        """The server's sums accumulate while the clients train: (new params, client
        losses, validation info, update norms), on the device."""
        stream, _, run_clients = self.runner_at(state.sigma)
        sums, stats = run_clients(view, inputs.specs, inputs.batch, inputs.keys)
        params = stream.finish(state.params, sums, server_key, divisor)
        return params, stats.loss, stats._asdict(), stats.norm

    def _stacked_round(self, state: ServerState, ids, view, inputs: RoundInputs, server_key,
                       divisor) -> tuple:
        """Every client's update at once: the simulated attack, reputation's refusals and
        the stacked server step. Returns as ``_streamed_round``."""
        _, server_step, run_clients = self.runner_at(state.sigma)
        glob, in_round, min_flags = self.glob, self.run.attackers[ids], self.rules.min_flags
        result = run_clients(view, inputs.specs, inputs.batch, inputs.keys)
        levels = glob(jnp.asarray(self.run.assignment[ids]))
        deltas = (self.attack(result.delta, result.mask, glob(jnp.asarray(in_round)),
                              glob(inputs.streams["attack"]), levels=levels)
                  if self.attack is not None and in_round.any() else result.delta)
        refused = ((glob(jnp.asarray(reputation.excluded(state.reputation, ids, min_flags))),)
                   if min_flags else ())   # reputation
        params, info = server_step(state.params, deltas, result.mask, levels, server_key,
                                   divisor, *refused)
        return params, result.loss, info, update_norms(deltas)

    def block_at(self, sigma: float) -> Callable:
        """``rounds_program`` of this run's streamed round at DP noise σ, compiled:
        ``(params, first, count, ids[capacity, C], train) -> (params, ClientStats[capacity,
        C])``; it donates ``params``."""
        if sigma not in self._blocks:
            reduce, stream, _ = self.servers(sigma)
            clients = engine.program_runner(self.fns, self.strategy,
                                            clients_per_chunk=self.chunk, reduce=reduce)
            round_inputs, divisor_fn = self.round_inputs, self.divisor

            def one_round(params, rnd, ids, train):
                streams, round_state, keys, specs, batch = round_inputs(params, rnd, ids, train)
                divisor = divisor_fn(params, round_state) if sigma > 0 else 0.0
                sums, stats = clients(params, specs, batch, keys)
                return stream.finish(params, sums, streams["server"], divisor), stats

            self._blocks[sigma] = xla.jit(rounds_program(one_round),
                                          xla.compiler_options(self.xla), donate_argnums=0)
        return self._blocks[sigma]

    def apply_rounds(self, state: ServerState, id_rows: Sequence[np.ndarray]
                     ) -> tuple[ServerState, list[RoundStats]]:
        """Rounds ``state.round``, ``state.round + 1``, … with clients ``id_rows[i]``: up to
        ``max_block(schedule)`` of them compiled together when the round can be (streamed
        server inputs, the loop or vmap strategy, one process), else one by one. Each
        round's ``seconds`` is its block's wall time over the block's rounds. As ``apply``,
        it donates ``state.params`` (the state passed in is spent). A diverged round raises
        ``TrainingError`` whose ``rounds`` holds the ``RoundStats`` of the rounds before it."""
        out: list[RoundStats] = []
        try:
            if self.capacity > 1:
                for s in range(0, len(id_rows), self.capacity):
                    state = self._apply_block(state, id_rows[s:s + self.capacity], out)
            else:
                for ids in id_rows:
                    state, stats = self.apply(state, ids)
                    out.append(stats)
            return state, out
        except TrainingError as e:
            e.rounds = out
            raise

    def _apply_block(self, state: ServerState, id_rows: Sequence[np.ndarray],
                     out: list[RoundStats]) -> ServerState:
        """Rounds ``id_rows`` (at most ``capacity``) as one program, each round's stats
        appended to ``out`` as the host concludes it; the state after them."""
        rows = np.stack([np.asarray(i) for i in id_rows])
        t0, n = time.time(), len(rows)
        padded = np.concatenate([rows, np.repeat(rows[-1:], self.capacity - n, axis=0)])
        params, table = self.block_at(state.sigma)(state.params, jnp.int32(state.round),
                                                   jnp.int32(n), jnp.asarray(padded),
                                                   self.run.data.train)
        table = jax.device_get(table)   # the block's one wait (one process here)
        return conclude_block(self.rules, state, params, rows, table, (time.time() - t0) / n,
                              out)


def rounds_program(one_round: Callable) -> Callable:
    """Up to ``capacity`` rounds as one program (no host sync between them): ``block(params,
    first, count, ids[capacity, C], train) -> (params, stats[capacity, …])`` runs
    ``one_round(params, rnd, ids, train) -> (params, stats)`` for rounds ``first … first +
    count − 1`` in a ``while`` loop, so every block length shares the one program; row ``i``
    of the table holds round ``first + i``'s per-client stats (rows past ``count``: zeros).
    A round whose mean client loss is not finite ends the block (the host reports it:
    ``conclude``)."""
    def block(params, first, count, ids, train):
        shapes = jax.eval_shape(one_round, params, first, ids[0], train)[1]
        table = jax.tree_util.tree_map(
            lambda a: jnp.zeros((ids.shape[0], *a.shape), a.dtype), shapes)

        def body(carry):
            i, params, table, _ = carry
            params, stats = one_round(params, first + i, ids[i], train)
            table = jax.tree_util.tree_map(lambda t, x: t.at[i].set(x), table, stats)
            return i + 1, params, table, jnp.isfinite(jnp.mean(stats.loss))

        carry = (jnp.int32(0), params, table, jnp.bool_(True))
        _, params, table, _ = jax.lax.while_loop(lambda c: (c[0] < count) & c[3], body,
                                                 carry)
        return params, table

    return block


class HostRules(NamedTuple):
    """What ``conclude`` (the host's part of a round) reads of the run and its options."""

    attackers: np.ndarray     # bool per client: a simulated attacker (``Run.attackers``)
    num_classes: int          # K, for the divergence bound (``divergence``)
    min_flags: int            # server.exclude_after_flags (0: reputation excludes nobody)
    sampling_rate: float      # q, for DP's ε
    dp_delta: float
    dp_accountant: str
    client_lr: Any            # client.learning_rate and server.learning_rate, as the
    server_lr: Any            # divergence error names them

    @classmethod
    def of(cls, run: Run) -> HostRules:
        """``run``'s and its options'."""
        o = run.options
        return cls(run.attackers, run.data.num_classes, o.server.exclude_after_flags,
                   sampling_rate(o.schedule), o.dp.delta, o.dp.accountant,
                   o.client.learning_rate, o.server.learning_rate)


def conclude(rules: HostRules, state: ServerState, params, ids: np.ndarray, losses: np.ndarray,
             accepted: np.ndarray, reason: np.ndarray, norms: np.ndarray, seconds: float
             ) -> tuple[ServerState, RoundStats]:
    """The host's part of round ``state.round``, from its per-client results on the host
    (NumPy only): the divergence check, the screening record, DP's ε, the ``RoundStats``.

    Args:
      params: the global model after the round, for the new state (inside a block of
        rounds, None but for its last round).
      ids: the round's clients; ``losses``, ``accepted``, ``reason`` (``validation.REASONS``
        indices), ``norms``: theirs, in that order.
      seconds: the round's wall time.

    Raises:
      TrainingError: the round diverged (``divergence`` says why).
    """
    rnd, sigma, in_round = state.round, state.sigma, rules.attackers[ids]
    train_loss = float(np.mean(losses))
    why = divergence(train_loss, reason, in_round, rules.num_classes)
    if why:
        raise TrainingError(
            f"training diverged in round {rnd + 1} ({why}); "
            f"lower config.client.learning_rate ({rules.client_lr}) or "
            f"config.server.learning_rate ({rules.server_lr})")
    if not accepted.any():
        print(f"fiarse-jax: warning: round {rnd + 1}: every update was rejected; "
              "the model is unchanged", file=sys.stderr, flush=True)
    segments = dp_segments(state.dp_segments, 1, sigma)
    record = reputation.update(state.reputation, ids, reason)
    everyone = np.arange(record.shape[0])
    excluded_total = (int(reputation.excluded(record, everyone, rules.min_flags).sum())
                      if rules.min_flags else None)
    epsilon = (privacy.epsilon_for_history(segments, sampling_rate=rules.sampling_rate,
                                           delta=rules.dp_delta, accountant=rules.dp_accountant)
               if sigma > 0 else None)
    return (ServerState(params, rnd + 1, sigma, segments, record),
            RoundStats(train_loss, norms[accepted], accepted, reason, int(in_round.sum()),
                       int((~accepted & ~in_round).sum()), excluded_total, epsilon, seconds))


def conclude_block(rules: HostRules, state: ServerState, params, rows: np.ndarray, table,
                   seconds: float, out: list[RoundStats]) -> ServerState:
    """``conclude`` for each round of a block (``rounds_program``), in turn; each round's
    ``RoundStats`` is appended to ``out`` as it concludes, so when a round diverged
    (``TrainingError``) ``out`` holds the rounds before it.

    Args:
      params: the global model after the block (the last round's state holds it).
      rows: ``rows[i]``, the clients of round ``state.round + i``.
      table: the block's per-client results on the host (``loss``, ``accepted``,
        ``reason``, ``norm``, each ``[capacity, C]``; rows from ``len(rows)`` on unused).
      seconds: each round's share of the block's wall time.

    Returns:
      The state after the block's rounds.
    """
    n = len(rows)
    for i in range(n):
        state, stats = conclude(rules, state, params if i == n - 1 else None, rows[i],
                                table.loss[i], table.accepted[i], table.reason[i],
                                table.norm[i], seconds)
        out.append(stats)
    return state


def client_schedule(schedule: Schedule, first: int, stop: int) -> list[np.ndarray]:
    """The clients of rounds ``first`` … ``stop − 1`` (``rng.sample_clients``: a pure
    function of the seed and the round), as ``apply_rounds`` takes them."""
    return [rng.sample_clients(schedule.seed, r, schedule.num_clients,
                               schedule.clients_per_round) for r in range(first, stop)]


def next_stop(schedule: Schedule, rnd: int, extra: Sequence[int] = ()) -> int:
    """The first round count after ``rnd`` at which the training loop acts on the host:
    an evaluation, a checkpoint, the end, a multiple of ``rounds_per_program`` (0:
    no limit of its own), or one of ``extra``. Multiples of absolute round counts, so a
    resumed run cuts its rounds into the same blocks as the uninterrupted one."""
    return min([schedule.num_rounds,
                *((rnd // e + 1) * e for e in _stop_periods(schedule)),
                *(x for x in extra if x > rnd)])


def max_block(schedule: Schedule) -> int:
    """The most rounds between two stops (``next_stop``) of the run: the shortest
    period (every multiple of it is a stop, the first one after round 0 included), or
    the whole run if shorter."""
    return max(1, min([schedule.num_rounds, *_stop_periods(schedule)]))


def _stop_periods(schedule: Schedule) -> list[int]:
    """The periods (in rounds) of the training loop's stops: evaluations, checkpoints and
    ``rounds_per_program`` (0: none)."""
    periods = (schedule.eval_every, schedule.checkpoint_every, schedule.rounds_per_program)
    return [p for p in periods if p > 0]


def round_row(stats: RoundStats, round_done: int, *, attack: bool) -> dict:
    """The ``rounds.jsonl`` row of one round."""
    norms = stats.norms
    row = {"round": round_done, "train_loss": stats.train_loss,
           "update_norm_mean": float(norms.mean()) if norms.size else 0.0,
           "update_norm_max": float(norms.max()) if norms.size else 0.0,
           "rejected": int((~stats.accepted).sum()),
           **{f"rejected_{name}": int(((stats.reason == i) & ~stats.accepted).sum())
              for i, name in enumerate(validation.REASONS) if i > 0},
           # direction_action = "flag": updates flagged against the consensus, still used
           "flagged": int(((stats.reason > 0) & stats.accepted).sum()),
           "round_time_s": round(stats.seconds, 4)}
    if attack:
        row["attackers"] = stats.attackers
        row["rejected_honest"] = stats.honest_rejected
    if stats.excluded_total is not None:
        row["excluded_total"] = stats.excluded_total
    if stats.dp_epsilon is not None:
        row["dp_epsilon"] = stats.dp_epsilon
    return row


@jax.jit
def update_norms(deltas) -> jax.Array:
    """L2 norm of each client's delta (leading client axis) over the whole pytree."""
    sq = sum(jnp.sum(jnp.square(d.reshape(d.shape[0], -1)), axis=1)
             for d in jax.tree_util.tree_leaves(deltas))
    return jnp.sqrt(sq)


def stream_blocker(server: ServerOptions, attack: AttackOptions) -> str | None:
    """Why this server rule needs every client's update at once (None: it can stream)."""
    return server_round.stream_blocker(
        aggregator=server.aggregator,
        attack=attack.kind if attack.kind in attacks.KINDS else "none",   # label_flip: data
        z_threshold=server.z_threshold if server.validate else None,
        cosine_threshold=server.cosine_threshold if server.validate else None,
        reputation=server.exclude_after_flags > 0)


def stream_updates(options: Options) -> bool:
    """Whether rounds sum the server's inputs while clients train (the engine's ``reduce``:
    ``auto`` streams whenever the server rule allows, ``stream`` always (``validate_config``
    refuses it where it cannot), ``stack`` never)."""
    mode = options.engine.reduce
    return mode == "stream" or (
        mode == "auto" and stream_blocker(options.server, options.attack) is None)


def _server(server: ServerOptions, clip_norm: float, sigma: float, streaming: bool):
    """(the engine's ``reduce`` hook or None, streamed server or None, stacked server step)
    of the ``server`` rule at DP noise σ and clip norm C."""
    options = dict(server.aggregator_options)
    stream = (server_round.make_streaming_round(
        server_lr=server.learning_rate, dp_noise_multiplier=sigma, dp_clip_norm=clip_norm,
        aggregator=server.aggregator, aggregator_options=options) if streaming else None)
    step = server_round.make_server_round(
        aggregator=server.aggregator, aggregator_options=options,
        z_threshold=server.z_threshold if server.validate else None,
        cosine_threshold=server.cosine_threshold if server.validate else None,
        screen=server.screen, direction_action=server.direction_action,
        server_lr=server.learning_rate, dp_noise_multiplier=sigma, dp_clip_norm=clip_norm)
    return (stream.contribution if streaming else None), stream, step


# --- differential privacy (DP-FedAvg) -------------------------------------------------------

def sampling_rate(schedule: Schedule) -> float:
    """q: the chance a client is sampled in a round."""
    return schedule.clients_per_round / schedule.num_clients


def noise_multiplier(dp: DPOptions, schedule: Schedule, spent: Sequence | None = None,
                     planned_rounds: int | None = None) -> float:
    """σ of DP-FedAvg for the rounds still to run: ``dp.noise_multiplier``, or calibrated to
    ``dp.target_epsilon`` over ``schedule.num_rounds`` (0: no DP).

    ``spent``: the ``[rounds, σ]`` segments a resumed run already ran (``dp_segments`` in
    its checkpoint), planned for ``planned_rounds`` rounds. With a target, σ stays the last
    segment's when ``num_rounds`` is still the planned one (bit-for-bit resumes); when it
    changed, σ for the remaining rounds is calibrated on top of what was spent
    (``privacy.calibrate_remaining``), so that the whole run spends the target."""
    if dp.target_epsilon <= 0:
        return float(dp.noise_multiplier)
    rounds = schedule.num_rounds
    opts = dict(sampling_rate=sampling_rate(schedule), delta=dp.delta, accountant=dp.accountant)
    if not spent:
        return privacy.calibrate_noise(dp.target_epsilon, rounds, **opts)
    done = sum(int(n) for n, _ in spent)
    if planned_rounds == rounds or done >= rounds:
        return float(spent[-1][1])   # the planned run, or no round left to run
    try:
        return privacy.calibrate_remaining(dp.target_epsilon, [tuple(x) for x in spent],
                                           rounds - done, **opts)
    except ValueError as e:
        raise ConfigError(f"config.dp.target_epsilon = {dp.target_epsilon}: {e}") from None


def dp_segments(spent: Sequence, rounds: int, sigma: float) -> tuple[tuple[int, float], ...]:
    """``spent`` followed by ``rounds`` rounds at ``sigma`` (merged into the last segment
    when its σ is the same): the σ history a checkpoint keeps for DP accounting."""
    out = [list(x) for x in spent]
    if out and out[-1][1] == sigma:
        out[-1][0] += rounds
    elif rounds > 0:
        out.append([rounds, sigma])
    return tuple((int(n), float(s)) for n, s in out)


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


# --- the client chunk ---------------------------------------------------------------------

def auto_chunk(options: engine.EngineOptions, fns, reduce, strategy: str, inputs) -> int:
    """``clients_per_chunk = "auto"``: the most clients per device trained at once
    whose round fits ``options.memory_budget_gb`` (GiB; 0: 90 % of the device memory still
    free), by XLA's compiled peak of the client round (``engine.fit_chunk``; every round
    has the same shapes, so one round's answer holds for all). The server step is not
    counted: with stacked server inputs and a robust rule, or rounds compiled together
    (the new model, and DP's divisor, live beside the training), leave headroom. ``inputs()``
    gives (params, keys, specs, data) of a round. ``loop`` trains one client at a time
    anyway: 0. Across processes every one decides, and all take the smallest answer."""
    if strategy == "loop":
        return 0
    budget_gb = options.memory_budget_gb
    params, keys, specs, data = inputs()
    if strategy == "sharded":   # the chunk is per device: fit one device's share
        per_device = -(-keys.shape[0] // jax.device_count())
        keys, specs, data = jax.tree_util.tree_map(lambda a: a[:per_device], (keys, specs, data))
    n, t0 = keys.shape[0], time.time()
    try:
        budget = int(budget_gb * 2**30) if budget_gb > 0 else memory.memory_budget()
        chunk, peak = engine.fit_chunk(fns, params, specs, data, keys, budget_bytes=budget,
                                       reduce=reduce, xla=options.xla)
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
              f"{memory.size_text(peak)}, budget {memory.size_text(budget)}; "
              f"{time.time() - t0:.0f} s to decide)", flush=True)
    return chunk
