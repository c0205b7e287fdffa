"""Figures of the peer benchmark's JSON (``run.py``): seconds per round against clients per
round for both sides, accuracy against training seconds, and ours' scaling run.

  python benchmarks/peers/plot.py [--peers benchmarks/results/peers_cpu.json]
      [--scaling benchmarks/results/peers_scaling_cpu.json] [--out docs/images/peers_cpu.png]
"""
from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "..", "results")
COLORS = {"ours": "tab:blue", "ours_sharded": "tab:green", "flower": "tab:orange"}
LABELS = {"ours": "fiarse_jax (loop)", "ours_sharded": "fiarse_jax (sharded, 1 device/core)",
          "flower": "Flower + PyTorch"}


def plot(peers: dict, scaling: dict | None, out: str) -> str:
    """Writes the figure to ``out`` (PNG or PDF by its suffix) and returns ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = 3 if scaling else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.6), constrained_layout=True)
    rows = peers["rows"]
    ax = axes[0]
    for side in COLORS:
        pts = sorted((r["clients_per_round"], r["round_s"]) for r in rows if r["side"] == side)
        if pts:
            ax.plot(*zip(*pts), "o-", color=COLORS[side], label=LABELS[side])
    ax.set(xscale="log", yscale="log", xlabel="clients per round",
           ylabel="seconds per round", title="Round time (after the first)")
    ax.legend()
    ax = axes[1]
    first = min(r["clients_per_round"] for r in rows)
    for r in rows:
        if r["clients_per_round"] != first or not r["evals"]:
            continue
        spent = [sum(r["round_times_s"][:e["round"]]) for e in r["evals"]]
        ax.plot(spent, [100 * e["global_accuracy"][0] for e in r["evals"]], "o-",
                color=COLORS[r["side"]], label=f"{LABELS[r['side']]}, full model")
        ax.plot(spent, [100 * e["global_accuracy"][-1] for e in r["evals"]], "s--",
                color=COLORS[r["side"]], alpha=0.6, label=f"{LABELS[r['side']]}, 1/64")
    target = peers["args"]["target"] * 100
    ax.axhline(target, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="training seconds (evaluation not counted)", ylabel="global accuracy (%)",
           title=f"{first} clients per round")
    ax.legend(fontsize=8)
    if scaling:
        ax = axes[2]
        pts = sorted((r["clients_per_round"], r["round_s"], r["peak_mb"])
                     for r in scaling["rows"])
        c, s, mb = zip(*pts)
        ax.plot(c, s, "o-", color=COLORS["ours"], label="seconds per round")
        ax.set(xscale="log", yscale="log", xlabel="clients per round",
               ylabel="seconds per round",
               title=f"fiarse_jax, K = {scaling['rows'][0]['local_steps']}, streamed sums")
        twin = ax.twinx()
        twin.plot(c, mb, "s--", color="tab:purple", label="peak memory (MiB)")
        twin.set(ylabel="peak memory, MiB (PSS)", ylim=(0, max(mb) * 1.2))
        ax.legend(loc="upper left", fontsize=8)
        twin.legend(loc="lower right", fontsize=8)
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default=os.path.join(RESULTS, "peers_cpu.json"))
    ap.add_argument("--scaling", default=os.path.join(RESULTS, "peers_scaling_cpu.json"))
    ap.add_argument("--out", default=os.path.join(HERE, "..", "..", "docs", "images",
                                                   "peers_cpu.png"))
    args = ap.parse_args(argv)
    with open(args.peers) as f:
        peers = json.load(f)
    scaling = None
    if args.scaling and os.path.exists(args.scaling):
        with open(args.scaling) as f:
            scaling = json.load(f)
    print(f"wrote {plot(peers, scaling, args.out)}")
    return args.out


if __name__ == "__main__":
    main()
