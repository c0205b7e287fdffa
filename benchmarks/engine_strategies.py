"""Time one round of client updates per execution strategy on the default config.

Usage:
  python benchmarks/engine_strategies.py [--rounds 20] [--clients 10] [--model mlp]
      [--out benchmarks/results/engine_strategies.json]  (default path)

Prints a table (seconds per round after a compile/warm-up round, client-steps/s,
and each strategy's time relative to ``loop``) and writes it as JSON. All
strategies run in the same process on the same data, params and keys.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import default as default_config  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, report  # noqa: E402

from fiarse_jax import engine, models, policies  # noqa: E402
from fiarse_jax.client import make_client_fns  # noqa: E402
from fiarse_jax.data import federate, load_digits  # noqa: E402
from fiarse_jax.train import assign_capacities, make_model_fns, sample_clients  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=10, help="clients per round")
    ap.add_argument("--model", default="mlp", choices=sorted(models.MODELS))
    ap.add_argument("--strategies", default="loop,vmap")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "engine_strategies.json"),
                    help="where to write the JSON result")
    args = ap.parse_args(argv)

    cfg = default_config.get_config()
    ds = load_digits()
    data = federate(ds, num_clients=cfg.data.num_clients, alpha=cfg.data.alpha,
                    test_fraction=cfg.data.test_fraction,
                    min_client_size=cfg.data.min_client_size, seed=cfg.seed)
    model = models.build_model(args.model, 10, {} if args.model == "cnn" else {"hidden_sizes": (128,)})
    params = model.init(jax.random.PRNGKey(0), data.train.x[0, :1])["params"]

    caps = tuple(cfg.capacities)
    policy = policies.build_policy("fiarse", caps, dict(cfg.fiarse))
    _, loss_fn = make_model_fns(model, policy)
    fns = make_client_fns(loss_fn, policy, optax.sgd(cfg.client.learning_rate),
                          num_steps=cfg.client.local_steps, batch_size=cfg.client.batch_size)
    assignment = assign_capacities(cfg.data.num_clients, len(caps))
    state = jax.jit(policy.prepare)(params, 0, jax.random.PRNGKey(0))
    spec_fn = jax.jit(jax.vmap(policy.client_spec, in_axes=(None, 0, 0)))
    per_round = min(args.clients, cfg.data.num_clients)

    def inputs(r):
        ids = sample_clients(0, r, cfg.data.num_clients, per_round)
        keys = jax.random.split(jax.random.PRNGKey(r), per_round)
        specs = spec_fn(state, jnp.asarray(assignment[ids]), keys)
        return specs, jax.tree_util.tree_map(lambda a: a[ids], data.train), keys

    rows = []
    for name in args.strategies.split(","):
        run = engine.make_round_runner(fns, name)
        t0 = time.perf_counter()
        jax.block_until_ready(run(params, *inputs(0)))
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for r in range(1, args.rounds + 1):
            out = run(params, *inputs(r))
        jax.block_until_ready(out)
        sec = (time.perf_counter() - t0) / args.rounds
        rows.append({"strategy": name, "first_round_s": round(warm, 3),
                     "round_s": round(sec, 4),
                     "client_steps_per_s": round(per_round * cfg.client.local_steps / sec, 1)})
    base = next((r["round_s"] for r in rows if r["strategy"] == "loop"), rows[0]["round_s"])
    for r in rows:
        r["relative_to_loop"] = round(r["round_s"] / base, 3)
    result = {"model": args.model, "clients_per_round": per_round,
              "local_steps": cfg.client.local_steps, "batch_size": cfg.client.batch_size,
              "rounds_timed": args.rounds, **environment(), "rows": rows}
    report(result, [("strategy", "strategy", ""), ("first_round_s", "first round s", ".3f"),
                    ("round_s", "round s", ".4f"), ("client_steps_per_s", "steps/s", ".1f"),
                    ("relative_to_loop", "vs loop", ".3f")], args.out)
    return result


if __name__ == "__main__":
    main()
