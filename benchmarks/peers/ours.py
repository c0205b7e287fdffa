"""The peer benchmark's workload run by ``fiarse_jax``, as training runs it.

``simulate`` builds the run from the workload's config (``workload.config``), the round
with ``fiarse_jax.federated.algorithm.build_algorithm`` (what ``fiarse-jax`` trains with: on CPU the
loop strategy with streamed server sums) and training's client schedule, one program per
round (training's default compiles the rounds up to the next evaluation into one), and
times each round on its own (``common.timed_rounds``). Every ``eval_every`` rounds the
library's evaluator scores each size's sub-model on the global test set (not timed).
"""
from __future__ import annotations

import time


def simulate(config, *, rounds: int, eval_every: int) -> dict:
    """Runs ``rounds`` rounds of ``config``; returns ``round_s``, ``train_loss``, ``evals``
    and the strategy used."""
    from common import timed_rounds

    from fiarse_jax.experiment import build
    from fiarse_jax.federated import evaluate as evaluate_lib
    from fiarse_jax.federated.algorithm import build_algorithm, client_schedule

    config.engine.rounds_per_program = 1
    config.eval.batch_size = 500
    run = build.build_run(config)
    alg = build_algorithm(run)
    state = alg.init(run.init_params)
    evaluate = evaluate_lib.run_evaluator(run)
    log: dict = {"round_s": [], "train_loss": [], "evals": [], "strategy": alg.strategy}
    for r in range(rounds):
        state, stats, seconds = timed_rounds(alg, state, client_schedule(run.options.schedule, r, r + 1))
        log["round_s"].append(seconds)
        log["train_loss"].append(float(stats[-1].train_loss))
        if (r + 1) % eval_every == 0:
            t = time.perf_counter()
            m = evaluate(state.params, r + 1)
            log["evals"].append({"round": r + 1, "global_accuracy":
                                 list(m["capacity_global_accuracy"].values()),
                                 "eval_s": time.perf_counter() - t})
    return log
