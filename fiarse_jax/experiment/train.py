"""``train_and_evaluate(config, workdir)``: the federated training loop.

Data flows config → data → model → mask policy (``build.build_run``) → client engine and
server (``algorithm.build_algorithm``) → metrics and checkpoints (here). The loop
samples each round's clients (``rng.sample_clients``: a pure function of seed and round),
lets the algorithm run the rounds up to the next evaluation or checkpoint
(``apply_rounds``: one compiled program where it can), logs them, evaluates every
``eval_every`` rounds and saves a checkpoint every ``checkpoint_every``; it knows nothing
of what a method does.

Outputs in ``workdir``: ``config.json`` (the run's config, at start), ``partition.json``
(who holds what), ``metrics.jsonl`` (one JSON object per evaluation), ``rounds.jsonl``,
``summary.json`` (config, final metrics, kept fractions, costs, timing; ``run_summary``)
and ``checkpoints/`` (Orbax; ``checkpoint``): running the same command again on the same
``workdir`` resumes from the latest checkpoint and gives the uninterrupted run's results
bit for bit; ``overwrite=True`` (``--overwrite``) starts over instead. A lock
(``workdir_lock``) keeps a second run out of a workdir in use.

Across processes (after ``jax.distributed.initialize``, strategy ``sharded``) every
process runs this same loop; process 0 alone writes files.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any

import jax
from tqdm.auto import tqdm

from fiarse_jax import policies
from fiarse_jax.core import connectivity
from fiarse_jax.core.capacities import capacity_label
from fiarse_jax.data.summary import federated_summary
from fiarse_jax.experiment import build, checkpoint, run_summary, workdir_lock
from fiarse_jax.experiment import metrics as metrics_lib
from fiarse_jax.federated import evaluate as evaluate_lib
from fiarse_jax.federated.algorithm import (
    TrainingError,
    build_algorithm,
    client_schedule,
    next_stop,
    round_row,
)
from fiarse_jax.utils import paths

__all__ = ["TrainingError", "train_and_evaluate"]


#: What a run writes in its workdir (``overwrite`` removes these, and PNGs).
RUN_OUTPUTS = ("checkpoints", "tensorboard", "profile", "metrics.jsonl", "rounds.jsonl",
               "summary.json", "partition.json", "config.json")


def train_and_evaluate(config, workdir: str, *, progress: bool | None = None,
                       overwrite: bool = False) -> dict[str, Any]:
    """Train ``config.method`` federatedly and evaluate it, resuming from ``workdir``.

    The run holds ``workdir``'s lock (``workdir_lock``): a second run into the same
    workdir is refused with one line naming the holder.

    Args:
      config: the run's ``ConfigDict`` (configs/default.py's fields); validated and
        parsed into typed options once (``build.build_run``).
      workdir: a local path or ``gs://`` URL for checkpoints, metrics and the summary.
      progress: show a tqdm bar (``None``: only on an interactive terminal).
      overwrite: start over: remove what an earlier run left in ``workdir``
        (``RUN_OUTPUTS``, PNGs) instead of resuming from it.

    Returns:
      The run's summary (what ``summary.json`` holds).

    Raises:
      ConfigError: a bad config field or workdir, in one line, before any work.
      TrainingError: the run diverged (the rounds before it are logged).
    """
    t_start = time.time()
    paths.check_workdir(workdir)   # a wrong bucket or permission: one line, before any work
    with workdir_lock.hold(workdir):
        if overwrite:
            if jax.process_index() == 0:
                clear_outputs(workdir)
            if jax.process_count() > 1:   # nobody looks for checkpoints before they are gone
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices("fiarse_jax_overwrite")
        return _train(config, workdir, progress, t_start)


def clear_outputs(workdir: str) -> None:
    """Remove a run's outputs from ``workdir`` (``RUN_OUTPUTS`` and PNG plots)."""
    if not paths.isdir(workdir):
        return
    for name in paths.listdir(workdir):
        if name in RUN_OUTPUTS or name.endswith(".png"):
            paths.remove_tree(os.path.join(workdir, name))


def _train(config, workdir: str, progress: bool | None, t_start: float) -> dict[str, Any]:
    lead = jax.process_index() == 0
    may_resume = checkpoint.has_checkpoints(workdir)   # pretrained weights only when fresh
    run = build.build_run(config, pretrained=not may_resume)
    algorithm = build_algorithm(run)
    evaluate = evaluate_lib.run_evaluator(run)
    paths.makedirs(workdir)
    ckpt = checkpoint.open_run(workdir, config)
    restored = ckpt and checkpoint.restore_run(ckpt, config, run.init_params, run.train_key,
                                               run.assignment)
    if restored:
        state = algorithm.init(restored.params, restored.round, restored.dp_segments,
                               restored.planned_rounds, restored.reputation)
        history, rounds = restored.history, restored.rounds
    else:   # a fresh start (also when no checkpoint was readable)
        params = build.load_pretrained(config, run.model, run.init_params) if may_resume \
            else run.init_params
        state, history, rounds = algorithm.init(params), [], []
    if (restored and state.round == config.num_rounds and history
            and history[-1]["round"] == state.round):
        # A finished run asked again: its last evaluation with today's evaluation settings
        # (eval.* may change on resume); the same numbers when they did not change.
        history[-1] = {**history[-1], **evaluate(state.params, state.round)}
    start = state.round
    disconnected = _start_files(run, config, workdir, fresh=start == 0, lead=lead)
    # The JSON-lines files are rewritten from the checkpoint's rows, so rounds a killed
    # run logged after its last checkpoint are not duplicated.
    writer = (metrics_lib.MetricWriter(workdir, evals=history, rounds=rounds,
                                       tensorboard=config.tensorboard)
              if lead else metrics_lib.NullWriter())
    profile_round = min(start + 1, config.num_rounds - 1) if config.profile else -1
    bar = tqdm(desc=config.method, unit="round", initial=start, total=config.num_rounds,
               disable=(not progress or not lead) if progress is not None else
               (None if lead else True))
    t_loop = time.time()
    try:
        while state.round < config.num_rounds:
            # Rounds up to the next evaluation or checkpoint: one compiled program where
            # the algorithm can (``apply_rounds``); the profiled round runs on its own.
            rnd = state.round
            stop = next_stop(run.options.schedule, rnd, (profile_round, profile_round + 1))
            ids = client_schedule(run.options.schedule, rnd, stop)
            try:
                with _trace(os.path.join(workdir, "profile"), rnd == profile_round):
                    state, block = algorithm.apply_rounds(state, ids)
            except TrainingError as e:   # the rounds before the diverged one are logged
                _log_rounds(e.rounds, rnd, rounds, writer, config)
                raise
            _log_rounds(block, rnd, rounds, writer, config)
            bar.update(len(block))
            done = state.round
            if rnd == start and lead:
                _estimate(time.time() - t_loop, len(block), config.num_rounds - done)
            if done % config.eval_every == 0 or done == config.num_rounds:
                history.append({"round": done, "train_loss": block[-1].train_loss,
                                **evaluate(state.params, done),
                                "elapsed_s": round(time.time() - t_start, 2)})
                writer.write_eval(history[-1])
                _show(bar, history[-1], config.num_rounds, lead)
            if config.checkpoint_every > 0 and (done % config.checkpoint_every == 0
                                                or done == config.num_rounds):
                checkpoint.save_run(ckpt, config, state, run.train_key, run.assignment,
                                    history, rounds)
    finally:
        bar.close()
        writer.close()
        if ckpt is not None:
            ckpt.close()
    summary = run_summary.summarize(config, run, algorithm, state, history, rounds,
                                    resumed_from=restored.round if restored else None,
                                    t_start=t_start, disconnected_at_start=disconnected)
    if lead:
        metrics_lib.write_atomic(os.path.join(workdir, "summary.json"),
                                 json.dumps(summary, indent=2, default=run_summary.jsonable))
    return summary


def _start_files(run, config, workdir: str, *, fresh: bool, lead: bool) -> dict:
    """What a run writes before training: ``config.json`` (the config accepted), and on a
    fresh start ``partition.json`` and the note on levels whose initial sub-model is cut off
    from the input (``connectivity``; not for a method reading out at early exits, which
    drops the deeper layers on purpose). Returns those levels (``disconnected_at_start``)."""
    disconnected = {} if policies.uses_exits(config.method) else connectivity.disconnected_levels(
        run.policy, run.model, run.init_params, run.eval_state(run.init_params, 0),
        [capacity_label(c) for c in run.capacities], run.eval_key)
    if not lead:
        return disconnected
    metrics_lib.write_atomic(os.path.join(workdir, "config.json"),
                             json.dumps(config.to_dict(), indent=2, default=run_summary.jsonable))
    if fresh:   # who holds what, written before any training
        metrics_lib.write_atomic(os.path.join(workdir, "partition.json"),
                                 json.dumps(federated_summary(run.data)))
        if disconnected:
            print(f"fiarse-jax: {connectivity.note(disconnected)}", file=sys.stderr, flush=True)
    return disconnected


def _log_rounds(block, first: int, rounds: list, writer, config) -> None:
    """``rounds.jsonl`` rows of rounds ``first + 1, …`` (their ``RoundStats``)."""
    for i, stats in enumerate(block):
        rounds.append(round_row(stats, first + i + 1, attack=config.attack.kind != "none"))
        writer.write_round(rounds[-1])


@contextlib.contextmanager
def _trace(directory: str, on: bool):
    """A ``jax.profiler`` trace of the block when ``on`` (``--config.profile``); to a
    remote ``directory``, traced locally and uploaded after."""
    if not on:
        yield
        return
    with paths.local_dir_for(directory, prefix="fiarse_jax_profile_") as local:
        jax.profiler.start_trace(local)
        try:
            yield
        finally:
            jax.profiler.stop_trace()


def _estimate(seconds: float, rounds_done: int, rounds_left: int) -> None:
    """After the first block: the time the rest will take at its pace, said up front when
    it is long (over 10 min; an upper estimate, the block's compilation included)."""
    left = seconds / max(rounds_done, 1) * rounds_left
    if left > 600:
        print(f"fiarse-jax: note: the first {rounds_done} round(s) took {seconds:.1f} s "
              f"(compilation included); the remaining {rounds_left} will take about "
              f"{left / 3600:.1f} h at this pace", file=sys.stderr, flush=True)


def _show(bar, m: dict, num_rounds: int, lead: bool) -> None:
    """An evaluation on the progress bar, or as a line when there is no bar."""
    bar.set_postfix(acc=f"{m['global_accuracy']:.3f}", loss=f"{m['train_loss']:.3f}")
    if bar.disable and lead:
        local = ", ".join(f"{k}: {v:.1%}" for k, v in m["local_accuracy"].items())
        print(f"round {m['round']}/{num_rounds}: full model {m['global_accuracy']:.1%} | "
              f"local by capacity {local} | train loss {m['train_loss']:.3f}", flush=True)
