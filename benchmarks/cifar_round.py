"""One FIARSE round of CIFAR ResNet-18 per execution strategy, and the share of it spent on
threshold/mask extraction.

Usage:
  python benchmarks/cifar_round.py [--clients 10] [--steps 5] [--rounds 2]
      [--widths 64,128,256,512] [--strategies loop,vmap] [--out FILE]

Synthetic data of CIFAR shape (uint8 32×32×3, 10 classes, 100 clients × 500 images),
the paper's four capacities and global thresholds, batch 20, on-device crop/flip/
normalise. Times (after a compile round): the clients' updates per round, and
``policy.prepare`` — the thresholds of every capacity level from one sort of |w| —
as a share of the round (target < 2 %). Prints a table and writes JSON. The paper's
K is 100; the default 5 keeps a CPU run short (the mask share then overstates its
K = 100 value roughly 20-fold).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import cifar10_resnet18  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, report  # noqa: E402

from fiarse_jax import engine, models, policies  # noqa: E402
from fiarse_jax.client import make_client_fns  # noqa: E402
from fiarse_jax.data import augment  # noqa: E402
from fiarse_jax.data.federated import Dataset, federate  # noqa: E402
from fiarse_jax.train import assign_capacities, make_model_fns, make_optimizer, sample_clients  # noqa: E402


def synthetic_cifar(n_train: int, n_test: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(x=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
                   y=rng.integers(0, 10, n_train).astype(np.int32), num_classes=10,
                   test_x=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
                   test_y=rng.integers(0, 10, n_test).astype(np.int32),
                   train_transform=augment.cifar_train_transform(),
                   eval_transform=augment.cifar_eval_transform())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10, help="clients per round")
    ap.add_argument("--steps", type=int, default=5, help="local steps K")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds after the compile round")
    ap.add_argument("--widths", default="64,128,256,512")
    ap.add_argument("--strategies", default="loop")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "cifar_round.json"))
    args = ap.parse_args(argv)

    cfg = cifar10_resnet18.get_config()
    cfg.client.local_steps = args.steps
    widths = tuple(int(w) for w in args.widths.split(","))
    data = federate(synthetic_cifar(50_000, 10_000), num_clients=100, alpha=0.3,
                    test_fraction=0.2, min_client_size=2, seed=0,
                    partition="balanced_dirichlet", n_train=500, n_test=100)
    model = models.build_model("resnet18", 10, {"widths": widths})
    x_one = augment.cifar_eval_transform()(data.train.x[0, :1])
    params = model.init(jax.random.PRNGKey(0), x_one)["params"]
    n_params = sum(v.size for v in jax.tree_util.tree_leaves(params))
    caps = tuple(cfg.capacities)
    policy = policies.build_policy("fiarse", caps, dict(cfg.fiarse))
    _, loss_fn = make_model_fns(model, policy)
    fns = make_client_fns(loss_fn, policy, make_optimizer(cfg), num_steps=args.steps,
                          batch_size=cfg.client.batch_size, augment=augment.cifar_train_transform())
    assignment = assign_capacities(100, len(caps))
    prepare = jax.jit(policy.prepare)
    spec_fn = jax.jit(jax.vmap(policy.client_spec, in_axes=(None, 0, 0)))

    def timed_prepare(r):
        t0 = time.perf_counter()
        state = jax.block_until_ready(prepare(params, r, jax.random.PRNGKey(r)))
        return state, time.perf_counter() - t0

    rows = []
    for name in args.strategies.split(","):
        run = engine.make_round_runner(fns, name)
        prep_s, round_s = [], []
        for r in range(args.rounds + 1):
            state, p_s = timed_prepare(r)
            ids = sample_clients(0, r, 100, args.clients)
            keys = jax.random.split(jax.random.PRNGKey(r), args.clients)
            specs = spec_fn(state, jnp.asarray(assignment[ids]), keys)
            batch = jax.tree_util.tree_map(lambda a: a[ids], data.train)
            t0 = time.perf_counter()
            jax.block_until_ready(run(params, specs, batch, keys))
            if r > 0:   # round 0 compiles
                prep_s.append(p_s)
                round_s.append(time.perf_counter() - t0)
        sec, prep = float(np.mean(round_s)), float(np.mean(prep_s))
        rows.append({"strategy": name, "round_s": round(sec, 3), "prepare_s": round(prep, 4),
                     "mask_share_pct": round(100 * prep / (sec + prep), 3),
                     "client_steps_per_s": round(args.clients * args.steps / sec, 2)})
    result = {"model": "resnet18", "widths": widths, "params": int(n_params),
              "clients_per_round": args.clients, "local_steps": args.steps, "batch_size": 20,
              "capacities": caps, "rounds_timed": args.rounds, **environment(), "rows": rows}
    print(f"ResNet-18 {widths}, {n_params:,} params, {args.clients} clients × {args.steps} steps, "
          f"batch 20, {jax.default_backend()}")
    report(result, [("strategy", "strategy", ""), ("round_s", "round s", ".3f"),
                    ("prepare_s", "prepare s", ".4f"), ("mask_share_pct", "mask %", ".3f"),
                    ("client_steps_per_s", "steps/s", ".2f")], args.out)
    return result


if __name__ == "__main__":
    main()
