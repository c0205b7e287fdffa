"""Where a round's time goes: a ``jax.profiler`` trace of a workload's rounds, summarised.

Usage:
  python benchmarks/profile_rounds.py [--workload digits_cnn] [--rounds 2] [--set FIELD=VALUE ...]
      [--label NAME] [--top 15] [--out benchmarks/results/profile_<backend>_<label>.json]

Builds the workload of ``benchmarks/rounds.py`` (its config and field overrides, e.g.
``--set client.local_steps=5 --set model.conv=xla``), runs ``--rounds`` rounds untimed
(compilation), then traces the same number of rounds (``Algorithm.apply_rounds``) and
reads the trace back: device time per XLA operation (on a GPU the kernels on its
streams; on CPU the operations XLA's CPU threads ran, control flow such as ``while``
left out, since it holds the others; XLA:CPU runs Eigen convolutions asynchronously, so
there a convolution's event covers its dispatch, not its work), grouped by kind (the
operation's name without its ``.N`` suffix) and by name, each with its share of the
device time, plus the wall time of the traced rounds. Prints a table, writes JSON (the
trace itself stays under ``--trace-dir`` when given, for TensorBoard/Perfetto).
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
#: Operations that only hold others (their time is their children's): left out.
CONTAINERS = re.compile(r"^(while|conditional|call|ThunkExecutor|SlinkyThreadPool|\$)"
                        r"|^np\.asarray")


def _value(text: str):
    """``--set`` values: Python literals where they parse, else the string."""
    import ast
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def summarize(trace: dict, top: int) -> dict:
    """Device time per operation of a Chrome-format trace (``traceEvents``)."""
    procs = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in trace["traceEvents"]
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    on_device = any(n.startswith("/device:") for n in procs.values())

    def device_op(e) -> bool:
        if e.get("ph") != "X" or CONTAINERS.search(e["name"]):
            return False
        if on_device:   # kernels on an accelerator's streams
            return procs.get(e["pid"], "").startswith("/device:")
        return "XLA" in threads.get((e["pid"], e.get("tid")), "") and \
            "PjRtCpuClient" not in threads.get((e["pid"], e.get("tid")), "")

    by_name, count = collections.Counter(), collections.Counter()
    for e in trace["traceEvents"]:
        if device_op(e):
            by_name[e["name"]] += e.get("dur", 0) / 1e3
            count[e["name"]] += 1
    by_kind, kind_count = collections.Counter(), collections.Counter()
    for name, ms in by_name.items():
        kind = re.sub(r"[._]\d+$", "", name)
        by_kind[kind] += ms
        kind_count[kind] += count[name]
    total = sum(by_name.values()) or 1.0

    def rows(times, calls):
        return [{"name": k, "ms": v, "share": v / total, "calls": calls[k]}
                for k, v in times.most_common(top)]

    return {"device_ms": total, "by_kind": rows(by_kind, kind_count),
            "by_name": rows(by_name, count),
            "source": "device streams" if on_device else "XLA CPU threads"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="digits_cnn")
    ap.add_argument("--rounds", type=int, default=2, help="rounds traced (after as many untimed)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="config field override, e.g. client.local_steps=5 (repeatable)")
    ap.add_argument("--label", default="", help="a name for this variant (output file, JSON)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--trace-dir", default=None, help="keep the trace here")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, HERE)
    import jax
    import rounds as workloads
    from common import environment

    from fiarse_jax.experiment import build
    from fiarse_jax.federated.algorithm import build_algorithm, client_schedule
    if args.workload not in workloads.WORKLOADS:
        ap.error(f"--workload {args.workload!r}: expected one of {sorted(workloads.WORKLOADS)}")
    extra = {}
    for item in args.set:
        field, eq, value = item.partition("=")
        if not eq:
            ap.error(f"--set {item!r}: expected FIELD=VALUE")
        extra[field] = _value(value)
    config = workloads.load_config(args.workload, 0, {"eval_every": args.rounds, **extra})
    run = build.build_run(config)
    alg = build_algorithm(run)
    state = alg.init(run.init_params)

    def rounds(state, first):
        state, _ = alg.apply_rounds(state, client_schedule(run.options.schedule, first, first + args.rounds))
        jax.block_until_ready(state.params)
        return state

    state = rounds(state, 0)
    with tempfile.TemporaryDirectory() as tmp:
        where = args.trace_dir or tmp
        jax.profiler.start_trace(where)
        t0 = time.perf_counter()
        state = rounds(state, args.rounds)
        wall = time.perf_counter() - t0
        jax.profiler.stop_trace()
        paths = sorted((os.path.join(d, f) for d, _, fs in os.walk(where) for f in fs
                        if f.endswith(".trace.json.gz")), key=os.path.getmtime)
        with gzip.open(paths[-1]) as f:
            summary = summarize(json.load(f), args.top)
    backend = jax.default_backend()
    label = args.label or "default"
    result = {"environment": environment(), "workload": args.workload, "label": label,
              "overrides": extra, "rounds": args.rounds, "wall_s": wall,
              "wall_s_per_round": wall / args.rounds, "strategy": alg.strategy,
              "rounds_per_program": alg.rounds_per_program, **summary}
    print(f"{args.workload} [{label}] on {backend}: {args.rounds} rounds in {wall:.2f} s; "
          f"device time {summary['device_ms'] / 1e3:.2f} s ({summary['source']})")
    for key in ("by_kind", "by_name"):
        print(f"\n{'ms':>10} {'share':>6} {'calls':>6}  {key[3:]}")
        for r in result[key]:
            print(f"{r['ms']:10.1f} {r['share']:6.1%} {r['calls']:>6}  {r['name']}")
    out = args.out or os.path.join(HERE, "results", f"profile_{backend}_{args.workload}_{label}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
