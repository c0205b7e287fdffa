"""Plot the ResNet-18 round's time over PyTorch's across K and clients per round.

Usage:
  python benchmarks/resnet_sweep_plot.py RESULT.json [RESULT.json ...] --out PNG

Reads the ``resnet`` rows of ``benchmarks/suite.py`` results (``--resnet-steps`` and
``--resnet-clients`` sweeps) and draws each JAX strategy's ``vs_torch`` ratio (its round's
seconds over the authors'-style PyTorch round's in the same group): against K at the
smallest client count, and against clients per round at the smallest K.
"""
from __future__ import annotations

import argparse
import json


def rows(paths: list[str]) -> list[dict]:
    """Every timed JAX row of the files' ``resnet`` sections that has a PyTorch ratio."""
    out = []
    for p in paths:
        with open(p) as f:
            out += [r for r in json.load(f).get("resnet", [])
                    if r.get("framework") == "jax" and r.get("vs_torch")]
    return out


def label(r: dict) -> str:
    return r["strategy"] + (f" ({r['variant']})" if r.get("variant") else "")


def plot(found: list[dict], out: str) -> None:
    """Two panels (ratio vs K, ratio vs clients); one colour per strategy/variant; where two
    runs measured the same point both are drawn and the line goes through their mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    colours = {name: f"C{i}" for i, name in enumerate(sorted({label(r) for r in found}))}
    n0, k0 = min(r["clients"] for r in found), min(r["steps"] for r in found)
    for ax, (axis, fixed, xlabel, value) in zip(axes, (
            ("steps", "clients", "K (local steps)", n0),
            ("clients", "steps", "clients per round", k0))):
        series: dict[str, dict] = {}
        for r in found:
            if r[fixed] == value:
                series.setdefault(label(r), {}).setdefault(r[axis], []).append(r["vs_torch"])
        for name, pts in sorted(series.items()):
            xs = sorted(pts)
            for x in xs:
                ax.plot([x] * len(pts[x]), pts[x], "o", color=colours[name])
            ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], "-", color=colours[name],
                    label=name)
        ax.axhline(1.0, color="grey", lw=1, ls="--")
        ticks = sorted({r[axis] for r in found if r[fixed] == value})
        ax.set(xscale="log", xlabel=xlabel, xticks=ticks,
               title=f"{'clients per round' if fixed == 'clients' else 'K'} = {value}")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("s per round / PyTorch's (authors')")
    fig.suptitle("CIFAR ResNet-18 on a 2-core CPU: JAX round time over PyTorch's")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", default="docs/images/resnet_cpu_sweep.png")
    args = ap.parse_args(argv)
    found = rows(args.results)
    if not found:
        ap.error(f"no ResNet-18 rows with a PyTorch ratio in {args.results}")
    plot(found, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
