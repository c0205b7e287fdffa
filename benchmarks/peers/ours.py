"""The peer benchmark's workload run by ``fiarse_jax``, as training runs it.

``simulate`` builds the run from the workload's config (``workload.config``), the round
with ``fiarse_jax.algorithm.build_algorithm`` (what ``fiarse-jax`` trains with: on CPU the
loop strategy with streamed server sums), one program per round (training's default
compiles the rounds up to the next evaluation into one), and times each round on its own (clients sampled
by ``fiarse_jax.rng.sample_clients``, results on the host). Every ``eval_every`` rounds the
library's evaluator scores each size's sub-model on the global test set (not timed).
"""
from __future__ import annotations

import time


def simulate(config, *, rounds: int, eval_every: int, export_to: str | None = None) -> dict:
    """Runs ``rounds`` rounds of ``config``; returns ``round_s``, ``train_loss``, ``evals``.
    ``export_to``: also write the workload file for the other side there (``workload.export``)."""
    import jax

    from fiarse_jax import build, rng
    from fiarse_jax import evaluate as evaluate_lib
    from fiarse_jax.algorithm import build_algorithm

    config.engine.rounds_per_program = 1
    config.eval.batch_size = 500
    run = build.build_run(config)
    if export_to:
        import workload
        workload.export(run, config, export_to)
    alg = build_algorithm(run, config)
    state = alg.init(run.init_params)
    evaluate = evaluate_lib.run_evaluator(run)
    log: dict = {"round_s": [], "train_loss": [], "evals": [], "strategy": alg.strategy}
    for r in range(rounds):
        ids = [rng.sample_clients(config.seed, r, config.data.num_clients,
                                  config.clients_per_round)]
        t = time.perf_counter()
        state, stats = alg.apply_rounds(state, ids)
        jax.block_until_ready(state.params)
        log["round_s"].append(time.perf_counter() - t)
        log["train_loss"].append(float(stats[-1].train_loss))
        if (r + 1) % eval_every == 0:
            t = time.perf_counter()
            m = evaluate(state.params, r + 1)
            log["evals"].append({"round": r + 1, "global_accuracy":
                                 list(m["capacity_global_accuracy"].values()),
                                 "eval_s": time.perf_counter() - t})
    return log
