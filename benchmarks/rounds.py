"""Whole training rounds as users run them: one compiled program per round against rounds
compiled together (``engine.rounds_per_program``), plus the evaluation, extrapolated to
the config's whole run.

Usage:
  python benchmarks/rounds.py [--workloads digits_mlp,digits_cnn,cifar_smoke]
      [--blocks 2] [--block N] [--settings 1,0] [--eval-levels auto]
      [--out benchmarks/results/rounds_<backend>.json]

Per workload and setting (``rounds_per_program`` = 1, and 0 = every round up to the next
evaluation in one program), in one process each: build the run, run one block of
``eval_every`` (or ``--block``) rounds untimed (compilation), then time ``--blocks`` blocks
(``Algorithm.apply_rounds``, results on the host), and two evaluations (every capacity's
sub-model on the global and local tests; the second is timed) per ``--eval-levels`` mode
(``eval.levels``: e.g. ``map,vmap`` times both side by side, and ``eval_levels_max_diff``
is the largest difference between their metrics). The whole run is
extrapolated, not measured: ``num_rounds`` × s/round + evaluations × s/evaluation, plus
the measured compile times. Workloads:

* ``digits_mlp``: configs/default.py, the README's first command (200 rounds, K = 20);
* ``digits_cnn``: the same with the CNN (16, 32 conv, 64 dense);
* ``cifar_smoke``: configs/cifar_smoke.py (a narrow ResNet-18 on TFDS mock data) for 40
  rounds of 4 clients × K = 2, evaluated every 10;
* ``paper_resnet18``: configs/cifar10_resnet18.py on synthetic CIFAR-10-shaped arrays
  (``synthetic_cifar``) — the paper's shapes (ResNet-18, 10 of 100 clients × K = 100 ×
  batch 20, 800 rounds, evaluation every 20 on 10,000 global and 2,500 local test images
  per capacity): for an accelerator (on 2 CPU cores a round takes ~10 minutes).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

#: name -> (config file, its argument, field overrides)
WORKLOADS = {
    "digits_mlp": ("default.py", None, {}),
    "digits_cnn": ("default.py", None, {"model.name": "cnn", "model.hidden_sizes": (64,)}),
    "cifar_smoke": ("cifar_smoke.py", "four,global",
                    {"num_rounds": 40, "eval_every": 10}),
    "paper_resnet18": ("cifar10_resnet18.py", "four,global",
                       {"data.name": "arrays", "data.data_dir": "SYNTHETIC_CIFAR"}),
}


def synthetic_cifar(path: str, seed: int = 0) -> str:
    """CIFAR-10's shapes as an ``arrays`` .npz (random uint8 images, random labels; 50,000
    train and 10,000 test), written once at ``path``: no download, no TFDS."""
    if not os.path.exists(path):
        import numpy as np
        rng = np.random.default_rng(seed)
        tmp = path + ".tmp.npz"
        np.savez(tmp, x_train=rng.integers(0, 256, (50_000, 32, 32, 3), np.uint8),
                 y_train=rng.integers(0, 10, 50_000), num_classes=10,
                 x_test=rng.integers(0, 256, (10_000, 32, 32, 3), np.uint8),
                 y_test=rng.integers(0, 10, 10_000))
        os.replace(tmp, path)
    return path


def load_config(name: str, rounds_per_program: int, extra: dict | None = None):
    """The workload's config, checkpoints off, with ``engine.rounds_per_program`` and the
    ``extra`` fields (dotted names) set."""
    sys.path.insert(0, HERE)
    from common import load_config_file, set_fields
    file, arg, fields = WORKLOADS[name]
    config = load_config_file(file, arg)
    if fields.get("data.data_dir") == "SYNTHETIC_CIFAR":
        fields = {**fields, "data.data_dir": synthetic_cifar(
            os.path.join(os.environ.get("TMPDIR", "/tmp"), "fiarse_synthetic_cifar10.npz"))}
    set_fields(config, {**fields, "checkpoint_every": 0,
                        "engine.rounds_per_program": rounds_per_program, **(extra or {})})
    return config


def measure(name: str, rounds_per_program: int, blocks: int, block: int = 0,
            levels: tuple[str, ...] = ("auto",)) -> dict:
    """Time the workload's rounds and evaluation (this process; see the module docstring).
    ``block``: rounds per timed block (0: the config's ``eval_every``); the extrapolation
    still evaluates every ``eval_every`` rounds of the config and uses the first of
    ``levels`` (``eval.levels`` modes, each timed side by side: ``eval_s_<mode>``)."""
    from common import timed_rounds

    from fiarse_jax.experiment import build
    from fiarse_jax.federated import evaluate as evaluate_lib
    from fiarse_jax.federated.algorithm import build_algorithm, client_schedule

    config = load_config(name, rounds_per_program)
    eval_every = config.eval_every
    if block:
        config.eval_every = block
    t0 = time.perf_counter()
    run = build.build_run(config)
    alg = build_algorithm(run)
    build_s = time.perf_counter() - t0
    state, block = alg.init(run.init_params), config.eval_every

    def rounds(state, first: int):
        state, stats, seconds = timed_rounds(alg, state,
                                             client_schedule(run.options.schedule, first, first + block))
        return state, seconds, stats

    state, first_block_s, _ = rounds(state, 0)
    times = []
    for b in range(1, blocks + 1):
        state, seconds, stats = rounds(state, b * block)
        times.append(seconds)
    done = (blocks + 1) * block
    by_levels, scores = {}, {}
    for mode in levels:   # a first (compiling) and a second evaluation each
        options = run.options._replace(eval=dataclasses.replace(run.options.eval, levels=mode))
        evaluate = evaluate_lib.run_evaluator(run._replace(options=options))
        eval_times = []
        for _ in range(2):
            t = time.perf_counter()
            metrics = evaluate(state.params, done)
            eval_times.append(time.perf_counter() - t)
        by_levels[mode], scores[mode] = eval_times, metrics
    eval_times, metrics = by_levels[levels[0]], scores[levels[0]]
    round_s = sum(times) / (blocks * block)
    evals = math.ceil(config.num_rounds / eval_every)
    compile_s = max(first_block_s - block * round_s, 0.0) + max(eval_times[0] - eval_times[1], 0)
    return {"workload": name, "rounds_per_program": alg.rounds_per_program,
            "strategy": alg.strategy, "clients_per_round": config.clients_per_round,
            "local_steps": config.client.local_steps, "num_rounds": config.num_rounds,
            "eval_every": eval_every, "timed_rounds": blocks * block,
            "round_s": round_s, "first_block_s": first_block_s, "eval_s": eval_times[1],
            "first_eval_s": eval_times[0], "build_s": build_s,
            "run_s_extrapolated": build_s + compile_s + config.num_rounds * round_s
            + evals * eval_times[1],
            **({f"eval_s_{m}": t[1] for m, t in by_levels.items()} if len(levels) > 1 else {}),
            **({"eval_levels_max_diff": _max_diff(list(scores.values()))}
               if len(levels) > 1 else {}),
            "last_train_loss": stats[-1].train_loss,
            "global_accuracy": metrics["global_accuracy"]}


def _flat(metrics: dict, prefix: str = "") -> dict[str, float]:
    """A metrics dict's numbers by dotted name (nested dicts flattened)."""
    out = {}
    for k, v in metrics.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _max_diff(runs: list[dict]) -> float:
    """The largest difference between the first metrics dict and the others (NaN = NaN;
    a metric one of them lacks, or NaN against a number: infinity)."""
    first, worst = _flat(runs[0]), 0.0
    for other in map(_flat, runs[1:]):
        for k in first.keys() | other.keys():
            a, b = first.get(k), other.get(k)
            if a is None or b is None or math.isnan(a) != math.isnan(b):
                return math.inf
            worst = max(worst, 0.0 if math.isnan(a) else abs(a - b))
    return worst


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--workloads", default="digits_mlp,digits_cnn,cifar_smoke")
    ap.add_argument("--settings", default="1,0", help="rounds_per_program values, e.g. 1,0")
    ap.add_argument("--blocks", type=int, default=2, help="timed blocks of rounds")
    ap.add_argument("--block", type=int, default=0,
                    help="rounds per block (default: each workload's eval_every)")
    ap.add_argument("--eval-levels", default="auto",
                    help="eval.levels modes timed side by side, e.g. map,vmap (the first one "
                         "counts in the extrapolation)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*json.loads(args.measure))))
        return {}
    names, levels = args.workloads.split(","), args.eval_levels.split(",")
    # Checked by name: resolving "auto" would start a backend here, held while children run.
    from fiarse_jax.federated.evaluate import LEVEL_MODES
    bad = [m for m in levels if m not in LEVEL_MODES]
    if bad:
        ap.error(f"--eval-levels: eval.levels = {bad[0]!r}: must be one of {LEVEL_MODES}")
    bad = [n for n in names if n not in WORKLOADS]
    if bad:
        ap.error(f"--workloads: unknown {bad[0]!r}; expected some of {sorted(WORKLOADS)}")
    sys.path.insert(0, HERE)
    import jax
    from common import environment, report
    rows = []
    for name in names:
        for setting in (int(s) for s in args.settings.split(",")):
            r = subprocess.run([sys.executable, __file__, "--measure",
                                json.dumps([name, setting, args.blocks, args.block, levels])],
                               capture_output=True, text=True)
            if r.returncode != 0:
                tail = r.stderr.strip().splitlines()
                rows.append({"workload": name, "rounds_per_program": setting,
                             "error": tail[-1] if tail else "failed"})
                print(f"{name} rounds_per_program={setting}: {rows[-1]['error']}",
                      file=sys.stderr)
                continue
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    for r in rows:   # each setting against one program per round, same workload
        base = next((o for o in rows if o["workload"] == r["workload"]
                     and o.get("rounds_per_program") == 1 and "round_s" in o), None)
        r["speedup"] = base["round_s"] / r["round_s"] if base and "round_s" in r else None
    backend = jax.default_backend()
    out = args.out or os.path.join(HERE, "results", f"rounds_{backend}.json")
    result = {"environment": environment(), "blocks": args.blocks, "block": args.block,
              "rows": [r for r in rows if "round_s" in r],
              "errors": [r for r in rows if "error" in r]}
    report(result, [("workload", "workload", ""), ("rounds_per_program", "per program", "d"),
                    ("round_s", "s/round", ".4f"), ("speedup", "speedup", ".2f"),
                    ("eval_s", "s/eval", ".3f"),
                    *[(f"eval_s_{m}", f"s/eval {m}", ".3f") for m in levels if len(levels) > 1],
                    ("first_block_s", "1st block s", ".1f"),
                    ("run_s_extrapolated", "run s (extrap.)", ".0f")], out)
    return result


if __name__ == "__main__":
    main()
