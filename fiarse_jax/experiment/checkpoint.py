"""Exact resumption with Orbax: a run killed at any moment continues as if nothing happened.

``WORKDIR/checkpoints/<round>/`` is written by ``orbax.checkpoint.CheckpointManager``
every ``config.checkpoint_every`` rounds and after the last round, keeping the last
``config.keep_checkpoints``. Orbax writes a step into a temporary directory and
renames it when complete, so a kill during a save leaves the previous checkpoint as
the latest usable one (the unfinished directory is ignored and cleaned up).

A checkpoint holds everything the next round depends on:

* ``state`` (arrays): the global params, the round number, the run's base PRNG key
  and the client → capacity assignment;
* ``meta`` (JSON): the checkpoint ``format``, the config it was made from, the metrics
  history (evaluations and rounds) and, with DP, the σ history ``dp_segments``
  (``[rounds, σ]`` runs, so ε composes over a σ that a resume recalibrated), and each
  client's screening record (``reputation``: rounds screened, rounds flagged).

Everything else a round uses is a pure function of (seed, round): the client sample
(``rng.sample_clients``), the round's named key streams (``rng.round_streams``), the
policy's round state (FedRolex's window is ``round mod C``), Dirichlet partition and
model init; DP's σ is the last segment's while ``num_rounds`` is unchanged. The server
has no optimiser state (plain step η_g). So restoring the state gives bit-identical
later rounds on the same backend and strategy. A checkpoint of another ``FORMAT`` (an
older fiarse-jax: other random streams, batch orders, budgets) is refused.

Resuming with a config that differs in anything but ``SAFE_TO_CHANGE`` stops with a
``ConfigError`` naming the differing fields.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from fiarse_jax import policies
from fiarse_jax.experiment.config import ConfigError
from fiarse_jax.robust import aggregators
from fiarse_jax.utils import paths

#: What a round computes from a checkpoint; bumped when that changes (2: named random
#: streams, a fresh order per pass, structured budgets in parameters, σ history).
FORMAT = 2


#: Config fields that may change between a run and its resumption: the length of
#: the run, bookkeeping, and the execution strategy, XLA options and convolution
#: implementation (these agree to float rounding, so bit-for-bit equality holds only
#: when they are unchanged).
SAFE_TO_CHANGE = ("num_rounds", "eval_every", "checkpoint_every", "keep_checkpoints",
                  "tensorboard", "engine.strategy", "engine.clients_per_chunk", "engine.reduce",
                  "engine.memory_budget_gb", "engine.xla", "engine.rounds_per_program",
                  "model.conv",
                  "profile", "eval.batch_size", "eval.levels", "eval.global_order", "paper")

#: Config fields added after checkpoints were first written, with the value the code used
#: before they existed: a checkpoint without the field resumes when the current value is it.
ADDED_FIELDS = {"client.betas": [0.9, 0.999], "client.weight_decay": 1e-4,
                "client.local_epochs": 0.0, "model.early_exits": False,
                "server.screen": "held", "server.direction_action": "reject",
                "server.exclude_after_flags": 0}


def _plain(v):
    """Tuples (nested too) as lists: a config and its JSON form compare equal."""
    return [_plain(x) for x in v] if isinstance(v, (tuple, list)) else v


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = _plain(v)
    return out


def unused_prefixes(config: dict) -> tuple[str, ...]:
    """Config sections this run never reads: other methods' options, other aggregators'
    options, and AdamW's fields under SGD (a change there cannot change the run)."""
    method = config.get("method")
    client, server = config.get("client", {}), config.get("server", {})
    out = [f"{m}." for m in policies.POLICIES if m != method]
    out += [f"server.{a}." for a in aggregators.AGGREGATORS if a != server.get("aggregator")]
    if client.get("optimizer") == "sgd":
        out += ["client.betas", "client.weight_decay"]
    return tuple(out)


def config_differences(saved: dict, current: dict,
                       may_differ: tuple[str, ...] = SAFE_TO_CHANGE) -> list[str]:
    """Dotted names of fields (outside ``may_differ`` and the sections the current run
    does not read) that differ, with both values."""
    a, b = _flatten(saved), _flatten(current)
    unused = unused_prefixes(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in may_differ or key.startswith(unused):
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va == "<absent>" and key in ADDED_FIELDS and vb == ADDED_FIELDS[key]:
            continue   # written before the field existed, with the behaviour it now names
        if va != vb:
            diffs.append(f"{key}: checkpoint {va!r}, now {vb!r}")
    return diffs


class RunCheckpoints:
    """The checkpoints of one run directory (see module docstring)."""

    def __init__(self, workdir: str, *, keep: int = 3, read_only: bool = False):
        """``read_only``: only read (export, inspection): no cleanup of unfinished saves
        and no deletion of unreadable checkpoints, so a run writing them is not disturbed."""
        self.directory = os.path.join(paths.absolute(workdir), "checkpoints")
        self.read_only = read_only
        try:
            self.manager = ocp.CheckpointManager(
                paths.as_path(self.directory),
                options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                                     cleanup_tmp_directories=not read_only,
                                                     read_only=read_only,
                                                     enable_async_checkpointing=True),
                item_names=("state", "meta"))
        except Exception as e:  # noqa: BLE001 — a remote store Orbax cannot use: one line
            if paths.is_local(self.directory):
                raise
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            raise ConfigError(f"--workdir {workdir!r}: Orbax cannot open {self.directory} ({reason}); "
                              "checkpoints on gs:// need the google-cloud-storage package and "
                              "credentials for the bucket") from e

    def save(self, round_index: int, state: dict, meta: dict) -> None:
        """Start saving the state after ``round_index`` rounds (asynchronously; ``meta`` is
        serialised later, so pass values the caller will not mutate)."""
        self.manager.save(round_index, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _unreadable(self, step: int, e: Exception, warnings: list[str]) -> None:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        warnings.append(f"checkpoint at round {step} is unreadable ({reason}); "
                        "falling back to the previous one")
        if not self.read_only:
            self.manager.delete(step)

    def _meta(self, step: int) -> dict:
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or "config" not in meta or "history" not in meta:
            raise ValueError("its metadata is missing or incomplete")
        return meta

    def latest_meta(self) -> tuple[tuple[int, dict] | None, list[str]]:
        """((round, meta) of the newest checkpoint whose metadata reads, or None, warnings)."""
        warnings: list[str] = []
        for step in reversed(self.steps()):
            try:
                return (step, self._meta(step)), warnings
            except Exception as e:  # noqa: BLE001 — unreadable: fall back
                self._unreadable(step, e, warnings)
        return None, warnings

    def restore_latest(self, template: dict, check_meta: Callable[[int, dict], None] | None = None
                       ) -> tuple[tuple[int, dict, dict] | None, list[str]]:
        """((round, state, meta) of the newest readable checkpoint or None, warnings).

        For each checkpoint, newest first: its metadata is read and given to
        ``check_meta(round, meta)`` (which raises to refuse, e.g. a different config:
        then nothing is deleted), then its arrays are restored into ``template``'s
        structure, shapes and dtypes. A checkpoint whose files cannot be read is
        deleted (unless read-only) and the previous one tried, with a warning.
        """
        warnings: list[str] = []
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        for step in reversed(self.steps()):
            try:
                meta = self._meta(step)
            except Exception as e:  # noqa: BLE001
                self._unreadable(step, e, warnings)
                continue
            if check_meta is not None:
                check_meta(step, meta)
            try:
                state = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract)))["state"]
                _check_finite(state["params"])
            except Exception as e:  # noqa: BLE001 — corrupt arrays: fall back
                self._unreadable(step, e, warnings)
                continue
            return (step, state, meta), warnings
        if warnings:
            warnings.append("no readable checkpoint left; starting from round 0")
        return None, warnings

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def run_state(params, rounds_done: int, key, assignment) -> dict:
    """The arrays a checkpoint holds (also the restore template: same structure and dtypes)."""
    return {"params": params, "round": np.asarray(rounds_done, np.int32), "key": np.asarray(key),
            "assignment": np.asarray(assignment, np.int32)}


def _check_finite(tree) -> None:
    for leaf in jax.tree_util.tree_leaves(tree):
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError("it holds non-finite parameters")


def check_format(meta: dict) -> None:
    """Raise ``ConfigError`` unless ``meta`` was written in this ``FORMAT``."""
    found = meta.get("format", 1)
    if found != FORMAT:
        raise ConfigError(f"the workdir's checkpoint has format {found}, this fiarse-jax "
                          f"writes {FORMAT} (random streams, batch orders and structured "
                          "budgets changed, so the run cannot continue as it began); use a "
                          "new --workdir")


def check_resumable(saved_config: dict, config, saved_round: int) -> None:
    """Raise ``ConfigError`` if ``config`` cannot continue a run saved with ``saved_config``."""
    diffs = config_differences(saved_config, config.to_dict())
    if diffs:
        raise ConfigError(
            "the workdir holds a checkpoint of a different run; these fields differ: "
            + "; ".join(diffs) + f". Only {', '.join(SAFE_TO_CHANGE)} may change on resume "
            "(use a new --workdir for a new run)")
    if saved_round > config.num_rounds:
        raise ConfigError(f"config.num_rounds = {config.num_rounds}: the workdir's checkpoint is "
                          f"already at round {saved_round}; use num_rounds ≥ {saved_round}")


# --- one run's checkpoints, as the training loop uses them --------------------------------

class Restored(NamedTuple):
    """What a run resumes from: its round, params, logged rows and DP's σ history."""

    round: int
    params: Any
    history: list          # the evaluations so far
    rounds: list           # the per-round rows so far
    dp_segments: list      # [[rounds, σ], ...]
    planned_rounds: int    # the checkpointed run's ``num_rounds``
    reputation: list | None  # [[screened, flagged], ...] per client (None: not recorded)


def saved_rounds(workdir: str) -> list[int]:
    """The rounds of ``workdir``'s finished checkpoints (step directories are bare integers;
    a save in flight is not one yet), ascending; [] when there is none."""
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in paths.listdir(d) if n.isdigit()) if paths.isdir(d) else []


def has_checkpoints(workdir: str) -> bool:
    """Whether ``workdir`` holds a checkpoint directory with a step in it."""
    return bool(saved_rounds(workdir))


def open_run(workdir: str, config) -> RunCheckpoints | None:
    """The run's checkpoints when it saves some (``checkpoint_every`` > 0) or the workdir
    already has a checkpoint directory (resumed from even when this config saves none)."""
    if config.checkpoint_every > 0 or paths.isdir(os.path.join(workdir, "checkpoints")):
        return RunCheckpoints(workdir, keep=config.keep_checkpoints)
    return None


def restore_run(ckpt: RunCheckpoints, config, params, key, assignment) -> Restored | None:
    """The newest usable checkpoint of this run, or None (a fresh start); raises
    ``ConfigError`` when the workdir holds another run (see ``check_resumable``)."""
    restored, warnings = ckpt.restore_latest(
        run_state(params, 0, key, assignment),
        lambda step, meta: (check_format(meta), check_resumable(meta["config"], config, step)))
    for w in warnings:
        print(f"fiarse-jax: warning: {w}", file=sys.stderr, flush=True)
    if restored is None:
        return None
    step, state, meta = restored
    if (not np.array_equal(np.asarray(state["key"]), np.asarray(key))
            or not np.array_equal(np.asarray(state["assignment"]), assignment)):
        raise ConfigError("the checkpoint's PRNG key or capacity assignment differs from "
                          "this config's (made by another version of the code?); "
                          "use a new --workdir")
    print(f"resuming from the checkpoint at round {step} "
          f"({config.num_rounds - step} rounds to go)", flush=True)
    return Restored(step, state["params"], list(meta["history"]), list(meta.get("rounds", [])),
                    [list(s) for s in meta.get("dp_segments", [])], int(meta["config"]["num_rounds"]),
                    meta.get("reputation"))


def save_run(ckpt: RunCheckpoints, config, state, key, assignment, history: list,
             rounds: list) -> None:
    """Start saving ``state`` (an ``algorithm.ServerState``) with the run's logs (copies:
    the asynchronous save serialises them later)."""
    ckpt.save(state.round, run_state(state.params, state.round, key, assignment),
              {"format": FORMAT, "config": config.to_dict(), "history": list(history),
               "rounds": list(rounds), "dp_segments": [list(s) for s in state.dp_segments],
               "reputation": np.asarray(state.reputation).tolist()})
