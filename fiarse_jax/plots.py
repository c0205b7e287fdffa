"""Plots of one run (``fiarse-jax plot --workdir DIR``) and of a method comparison.

``plot_run(workdir)`` reads ``metrics.jsonl``, ``rounds.jsonl`` and ``summary.json``
and writes, in ``workdir``:

* ``accuracy_vs_round.png``: the full model and every capacity's sub-model on the
  global test set, and every sub-model on its own clients' local tests;
* ``loss_vs_round.png``: mean client training loss per round and global test loss;
* ``kept_per_layer.png``: the fraction of each layer's maskable parameters every
  capacity's sub-model keeps at the last round;
* ``partition.png``: every client's training label counts (from ``partition.json``).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from fiarse_jax import paths
from fiarse_jax.metrics import read_jsonl


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> None:
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=110)
    _pyplot().close(fig)


def by_size(capacities: dict[str, float]) -> list[str]:
    """Capacity labels, smallest first (as the paper's tables)."""
    return sorted(capacities, key=lambda k: capacities[k])


def grouped_bars(groups: Sequence[str], series: dict[str, Sequence[float]], ylabel: str,
                  ylim, path: str, errors: dict[str, Sequence[float]] | None = None) -> str:
    """One bar per series inside every group (``errors``: a series' ± error bars);
    legend outside the axes."""
    plt = _pyplot()
    errors = errors or {}
    fig, ax = plt.subplots(figsize=(3.2 + 0.45 * len(groups) * len(series), 3.6))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar(np.arange(len(groups)) + i * width - 0.4 + width / 2, values, width, label=name,
               yerr=errors.get(name), error_kw={"elinewidth": 1, "capsize": 2})
    ax.set_xticks(np.arange(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return path


def plot_run(workdir: str) -> list[str]:
    """Write the run's three PNGs (see module docstring); returns their paths."""
    summary_path = os.path.join(workdir, "summary.json")
    if not paths.exists(summary_path):
        raise FileNotFoundError(f"{workdir!r} holds no summary.json: not a finished run directory "
                                "(run `fiarse-jax --config ... --workdir DIR` first)")
    summary = json.loads(paths.read_text(summary_path))
    evals = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    rounds = read_jsonl(os.path.join(workdir, "rounds.jsonl"))
    labels = by_size(summary["capacities"])
    plt = _pyplot()
    x = [m["round"] for m in evals]

    fig, (ax_g, ax_l) = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    ax_g.plot(x, [100 * m["global_accuracy"] for m in evals], "k--", lw=1, label="full model", zorder=3)
    for l in labels:
        ax_g.plot(x, [100 * m["capacity_global_accuracy"][l] for m in evals], marker=".",
                  label=f"capacity {l}")
        ax_l.plot(x, [100 * m["local_accuracy"][l] for m in evals], marker=".", label=f"capacity {l}")
    for ax, title in ((ax_g, "global test (all clients)"), (ax_l, "local test (own clients)")):
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    ax_g.set_ylabel("accuracy (%)")
    fig.suptitle(f"{summary['config']['method']} on {summary['config']['data']['name']}")
    p1 = os.path.join(workdir, "accuracy_vs_round.png")
    _save(fig, p1)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    if rounds:
        ax.plot([r["round"] for r in rounds], [r["train_loss"] for r in rounds], alpha=0.8,
                label="client training loss (per round)")
    ax.plot(x, [m["global_loss"] for m in evals], "k-", marker=".", label="full model, global test")
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    p2 = os.path.join(workdir, "loss_vs_round.png")
    _save(fig, p2)

    kept = summary["kept_fraction_per_layer"]
    layers = list(kept[labels[-1]])
    p3 = grouped_bars(layers, {f"capacity {l}": [100 * kept[l][k] for k in layers] for l in labels},
                       f"kept at round {summary['final']['round']} (%)", (0, 105),
                       os.path.join(workdir, "kept_per_layer.png"))
    out = [p1, p2, p3]
    partition = os.path.join(workdir, "partition.json")
    if paths.exists(partition):
        from fiarse_jax.data.summary import plot_partition
        part = json.loads(paths.read_text(partition))
        out.append(plot_partition(part, os.path.join(workdir, "partition.png"),
                                  title=f"training samples per client ({summary['config']['data']['name']})"))
    return out


def plot_comparison(summaries: dict[str, dict | list[dict]], histories: dict[str, list],
                    workdir: str) -> list[str]:
    """Write the two PNGs; returns their paths. A name may map to one run's summary and
    history, or to lists of them, one per seed: then lines are the mean over seeds with a
    band of ± one standard deviation, bars carry ± std error bars."""
    plt = _pyplot()
    runs = {m: s if isinstance(s, list) else [s] for m, s in summaries.items()}
    hists = {m: h if h and isinstance(h[0], list) else [h] for m, h in histories.items()}
    first = next(iter(runs.values()))[0]
    labels = by_size(first["capacities"])
    panels = [(f"capacity {l}: local test", lambda m, l=l: m["local_accuracy"][l]) for l in labels]
    panels.append(("full model: global test", lambda m: m["global_accuracy"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), sharey=True)
    for ax, (title, get) in zip(np.atleast_1d(axes), panels):
        for method, seeds in hists.items():
            n = min(len(h) for h in seeds)   # the evaluations every seed has
            x = [m["round"] for m in seeds[0][:n]]
            ys = 100 * np.array([[get(m) for m in h[:n]] for h in seeds])
            line, = ax.plot(x, ys.mean(0), marker=".", label=method)
            if len(seeds) > 1:
                sd = ys.std(0, ddof=1)
                ax.fill_between(x, ys.mean(0) - sd, ys.mean(0) + sd, color=line.get_color(),
                                alpha=0.2, lw=0)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("accuracy (%)")
    np.atleast_1d(axes)[-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    p1 = os.path.join(workdir, "accuracy_vs_round.png")
    _save(fig, p1)

    local = {m: 100 * np.array([[s["final"]["local_accuracy"][l] for l in labels] for s in ss])
             for m, ss in runs.items()}
    p2 = grouped_bars(
        [f"capacity {l}" for l in labels], {m: a.mean(0) for m, a in local.items()},
        "local test accuracy (%)", (0, 100), os.path.join(workdir, "accuracy_per_capacity.png"),
        errors={m: a.std(0, ddof=1) for m, a in local.items() if len(a) > 1})
    return [p1, p2]
