"""fiarse_jax against Flower on the same federated workload, side by side in one run.

Usage (the benchmark extras: ``pip install -e ".[peers]"``; Flower, Ray and PyTorch are
never dependencies of the library)::

  python benchmarks/peers/run.py [--clients-per-round 10,100,1000] [--sides ours,flower]
      [--method fiarse] [--rounds 30,5,2] [--eval-every 5,5,2] [--target 0.75]
      [--out benchmarks/results/peers_cpu.json]
  python benchmarks/peers/run.py --scaling 100,1000,10000 [--scaling-steps 2]   # ours only

The workload (``workload.py``): CIFAR-shaped synthetic images, Dirichlet(0.5) over
max(100, C) clients, four sizes (1, 1/4, 1/16, 1/64), the small CNN, K = 20 local steps of
batch 20, FIARSE's masks (or HeteroFL's: ``--method heterofl``). Both sides start from the
same weights and train on the same rows (``workload.export``); Flower samples its own
clients each round (as its users get), so accuracies agree in kind, not bit for bit.

Each (side, clients per round) runs in its own process; this process samples the
proportional set size (PSS) of that process and all its descendants (Ray's raylet, GCS and
actors included) every 0.5 s for ``peak_mb`` (MiB). Per row: ``round_s`` (median over the rounds
after the first: Flower's first round starts its actors, ours compiles), ``first_round_s``,
the global accuracy of each size after the last round, and ``rounds_to_target`` /
``seconds_to_target``: the first evaluation where the full model reaches ``--target``, and
the training seconds spent until then (evaluation not counted; the first round counted).

Sides: ``ours`` runs the CPU default strategy (``loop``: clients one after another, each
step's operations on every core), one program per round so that each round is timed alone
(training's default compiles the rounds between evaluations into one program);
``ours_sharded`` runs ``engine.strategy = sharded`` with ``clients_per_chunk = 1`` over one
JAX CPU device per core
(``XLA_FLAGS=--xla_force_host_platform_device_count=<cores>``): a client at a time on each
device, as Flower runs one client per single-threaded actor; ``flower`` is
``flower_fiarse.py``.

``--scaling``: ours alone at growing clients per round (streamed server sums), every client
in every round (the 50,000 rows split i.i.d. over them: 5 each at 10,000), K =
``--scaling-steps``, two rounds each: seconds per round and peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))


def one(job: dict) -> dict:
    """A child's work (``--one``): export the workload, or one side's simulation."""
    if job["side"] == "flower":   # the exported file only: no JAX in this process
        import flower_fiarse
        return flower_fiarse.simulate(job["workload"], method=job["method"],
                                      clients_per_round=job["clients_per_round"],
                                      rounds=job["rounds"], eval_every=job["eval_every"],
                                      num_cpus=os.cpu_count() or 1)
    import workload
    config = workload.config(job["data"], num_clients=job["num_clients"],
                             clients_per_round=job["clients_per_round"], method=job["method"],
                             local_steps=job.get("local_steps", 20),
                             partition=job.get("partition", "dirichlet"),
                             min_client_size=job.get("min_client_size", 10))
    if job["side"] == "export":   # the run's data and initial weights, nothing trained
        from fiarse_jax.experiment import build
        workload.export(build.build_run(config), config, job["workload"])
        return {}
    if job["side"] == "ours_sharded":   # one client at a time on each host device
        config.engine.strategy, config.engine.clients_per_chunk = "sharded", 1
    import ours
    return ours.simulate(config, rounds=job["rounds"], eval_every=job["eval_every"])


def _pss_mb(pid: int) -> float:
    """PSS of ``pid`` and its descendants, MiB (RSS where PSS cannot be read; a process
    that has exited meanwhile counts 0)."""
    import psutil
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            try:
                total += p.memory_full_info().pss
            except (psutil.AccessDenied, AttributeError):
                total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def measured(job: dict) -> dict:
    """Runs ``job`` in a child process; its result plus ``peak_mb`` and ``wall_s``."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        env = dict(os.environ)
        if job["side"] == "ours_sharded":   # a JAX CPU device per core, before JAX starts
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                                f"device_count={os.cpu_count() or 1}").strip()
        p = subprocess.Popen([sys.executable, __file__, "--one", json.dumps(job)],
                             stdout=out, stderr=err, text=True, env=env)
        peak, done = [0.0], threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                peak[0] = max(peak[0], _pss_mb(p.pid))
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        p.wait()
        done.set()
        thread.join()
        out.seek(0)
        err.seek(0)
        if p.returncode:
            tail = err.read().strip().splitlines()[-5:]
            raise SystemExit(f"{job['side']} at {job['clients_per_round']} clients/round "
                             "failed:\n" + "\n".join(tail))
        lines = out.read().strip().splitlines()
    result = json.loads(lines[-1]) if lines else {}
    return {**result, "peak_mb": peak[0], "wall_s": time.perf_counter() - t0}


def row(side: str, job: dict, log: dict, target: float) -> dict:
    """A table row from a side's log (module docstring)."""
    import numpy as np
    times, evals = log["round_s"], log["evals"]
    reached = next((e for e in evals if e["global_accuracy"][0] >= target), None)
    return {"side": side, "method": job["method"], "clients_per_round": job["clients_per_round"],
            "num_clients": job["num_clients"], "local_steps": job.get("local_steps", 20),
            "rounds": len(times), "first_round_s": times[0],
            "round_s": float(np.median(times[1:])) if len(times) > 1 else times[0],
            "peak_mb": log["peak_mb"], "final_accuracy": evals[-1]["global_accuracy"]
            if evals else None, "train_loss": log["train_loss"],
            "rounds_to_target": reached["round"] if reached else None,
            "seconds_to_target": sum(times[:reached["round"]]) if reached else None,
            "round_times_s": times, "evals": evals,
            **({"strategy": log["strategy"]} if "strategy" in log else {})}


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--clients-per-round", default="10,100,1000")
    ap.add_argument("--sides", default="ours,ours_sharded,flower",
                    help="ours (the CPU default: loop), ours_sharded (engine.strategy="
                         "sharded over one JAX CPU device per core, one client at a time "
                         "on each), flower")
    ap.add_argument("--method", default="fiarse", choices=("fiarse", "heterofl"))
    ap.add_argument("--rounds", default="30,5,2", help="rounds per clients-per-round value")
    ap.add_argument("--eval-every", default="5,5,2")
    ap.add_argument("--target", type=float, default=0.75,
                    help="full-model global accuracy for the time-to-accuracy columns")
    ap.add_argument("--scaling", default="", help="ours alone at these clients per round")
    ap.add_argument("--scaling-steps", type=int, default=2)
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(),
                                                   "fiarse_peers_images.npz"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return {}
    import workload
    from common import environment, report
    data = workload.synthetic_images(args.data)
    rows, sides = [], args.sides.split(",")
    if args.scaling:
        for c in _ints(args.scaling):
            job = {"side": "ours", "data": data, "method": args.method, "num_clients": c,
                   "clients_per_round": c, "rounds": 2, "eval_every": 10**9,
                   "local_steps": args.scaling_steps, "partition": "iid", "min_client_size": 2}
            rows.append(row("ours", job, measured(job), args.target))
            print(f"ours {c} clients/round: {rows[-1]['round_s']:.2f} s/round, "
                  f"{rows[-1]['peak_mb']:.0f} MiB", file=sys.stderr, flush=True)
    cprs = _ints(args.clients_per_round) if not args.scaling else []
    rounds, evals = _ints(args.rounds), _ints(args.eval_every)
    for i, c in enumerate(cprs):
        n = max(100, c)
        job = {"data": data, "method": args.method, "num_clients": n, "clients_per_round": c,
               "rounds": rounds[min(i, len(rounds) - 1)],
               "eval_every": evals[min(i, len(evals) - 1)],
               "workload": os.path.join(tempfile.gettempdir(), f"fiarse_peers_{args.method}_{n}.npz")}
        if "flower" in sides:   # written afresh: never another run's rows or weights
            measured({**job, "side": "export"})
        for side in sides:
            rows.append(row(side, job, measured({**job, "side": side}), args.target))
            r = rows[-1]
            print(f"{side} {c} clients/round: {r['round_s']:.2f} s/round, "
                  f"{r['peak_mb']:.0f} MiB, accuracy {r['final_accuracy']}",
                  file=sys.stderr, flush=True)
    for r in rows:   # Flower's time over each of ours, same clients per round
        f = next((q for q in rows if q["side"] == "flower"
                  and q["clients_per_round"] == r["clients_per_round"]), None)
        r["flower_over_ours"] = (f["round_s"] / r["round_s"]
                                 if f and r["side"] != "flower" else None)
    versions = {}
    for name in ("flwr", "torch"):   # only where installed (the peers extra)
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    result = {"environment": {**environment(), **versions},
              "args": vars(args), "rows": rows}
    name = "peers_scaling_cpu.json" if args.scaling else "peers_cpu.json"
    out = args.out or os.path.join(HERE, "..", "results", name)
    report(result, [("side", "side", ""), ("clients_per_round", "clients/round", "d"),
                    ("round_s", "s/round", ".2f"), ("first_round_s", "1st round s", ".1f"),
                    ("flower_over_ours", "Flower/ours", ".2f"), ("peak_mb", "peak MiB", ".0f"),
                    ("rounds_to_target", "rounds to target", ""),
                    ("seconds_to_target", "s to target", ".0f")], out)
    return result


if __name__ == "__main__":
    main()
