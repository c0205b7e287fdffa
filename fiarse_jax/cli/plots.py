"""Plots of one run (``fiarse-jax plot --workdir DIR``) and of a method comparison.

``plot_run(workdir, out=None, fmt="png")`` reads ``metrics.jsonl``, ``rounds.jsonl`` and
``summary.json`` — or, for a run still going or interrupted, ``config.json`` in place of
the summary — and writes, in ``out`` (default: ``workdir``):

* ``accuracy_vs_round``: the full model and every capacity's sub-model on the global
  test set, and every sub-model on its own clients' local tests (one legend for both);
* ``loss_vs_round``: mean client training loss per round and global test loss;
* ``kept_per_layer`` (finished runs): the fraction of each layer's maskable parameters
  every capacity's sub-model keeps at the last round;
* ``partition``: every client's training label counts (from ``partition.json``).

``fmt``: ``png`` (150 dpi), ``pdf`` or ``svg`` (vector, for a paper).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from fiarse_jax.core.capacities import by_size as labels_by_size
from fiarse_jax.experiment.metrics import read_jsonl
from fiarse_jax.utils import paths


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


#: ``plot --format``: what ``plot_run`` can write.
FORMATS = ("png", "pdf", "svg")


def _save(fig, path: str) -> None:
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=150)
    _pyplot().close(fig)


def grouped_bars(groups: Sequence[str], series: dict[str, Sequence[float]], ylabel: str,
                  ylim, path: str, errors: dict[str, Sequence[float]] | None = None) -> str:
    """One bar per series inside every group (``errors``: a series' ± error bars); a NaN
    value (a cell not run) draws no bar but an "n/a" mark; legend outside the axes."""
    plt = _pyplot()
    errors = errors or {}
    fig, ax = plt.subplots(figsize=(3.2 + 0.45 * len(groups) * len(series), 3.6))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = np.arange(len(groups)) + i * width - 0.4 + width / 2
        ax.bar(xs, values, width, label=name, yerr=errors.get(name),
               error_kw={"elinewidth": 1, "capsize": 2})
        for x, v in zip(xs, values):
            if not np.isfinite(v):   # not run: absent, not 0
                ax.text(x, ylim[0], "n/a", ha="center", va="bottom", fontsize=7,
                        color="0.4")
    ax.set_xticks(np.arange(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return path


def _run_facts(workdir: str) -> tuple[dict, dict | None]:
    """(config, summary or None): a finished run's summary, else the config a running or
    interrupted run wrote at its start."""
    summary_path = os.path.join(workdir, "summary.json")
    if paths.exists(summary_path):
        summary = json.loads(paths.read_text(summary_path))
        return summary["config"], summary
    config_path = os.path.join(workdir, "config.json")
    if paths.exists(config_path):
        return json.loads(paths.read_text(config_path)), None
    raise FileNotFoundError(f"{workdir!r} holds no summary.json or config.json: not a run "
                            "directory (run `fiarse-jax --config ... --workdir DIR` first)")


def plot_run(workdir: str, out: str | None = None, fmt: str = "png") -> list[str]:
    """Write the run's figures (see module docstring) into ``out`` (default ``workdir``)
    as ``fmt``; returns their paths. Works on a finished, running or interrupted run."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}")
    config, summary = _run_facts(workdir)
    evals = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    if not evals:
        raise FileNotFoundError(f"{workdir!r} has no evaluation yet (metrics.jsonl is empty "
                                f"or absent): plot again after round {config['eval_every']}")
    rounds = read_jsonl(os.path.join(workdir, "rounds.jsonl"))
    out = workdir if out is None else out
    paths.makedirs(out)
    labels = labels_by_size(evals[-1]["local_accuracy"])
    plt = _pyplot()
    x = [m["round"] for m in evals]
    status = "" if summary else f" (running or stopped: {x[-1]} of {config['num_rounds']} rounds)"

    fig, (ax_g, ax_l) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for l in labels:
        line, = ax_g.plot(x, [100 * m["capacity_global_accuracy"][l] for m in evals],
                          marker="o", ms=3, label=f"capacity {l}")
        ax_l.plot(x, [100 * m["local_accuracy"][l] for m in evals], marker="o", ms=3,
                  color=line.get_color())
    # The full model over the capacity-1 line: black, dashed, thicker, drawn last.
    ax_g.plot(x, [100 * m["global_accuracy"] for m in evals], "k--", lw=2, label="full model",
              zorder=3)
    for ax, title in ((ax_g, "global test set (all clients)"), (ax_l, "local tests (own clients)")):
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    ax_g.set_ylabel("accuracy (%)")
    handles, names = ax_g.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=9,
               bbox_to_anchor=(0.5, -0.02), frameon=False)
    fig.suptitle(f"{config['method']} on {config['data']['name']}{status}")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    p1 = os.path.join(out, f"accuracy_vs_round.{fmt}")
    paths.save_figure(fig, p1, dpi=150)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    if rounds:
        ax.plot([r["round"] for r in rounds], [r["train_loss"] for r in rounds], alpha=0.8,
                label="client training loss (per round)")
    ax.plot(x, [m["global_loss"] for m in evals], "k-", marker="o", ms=3,
            label="full model, global test")
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    p2 = os.path.join(out, f"loss_vs_round.{fmt}")
    _save(fig, p2)
    result = [p1, p2]

    if summary:
        kept = summary["kept_fraction_per_layer"]
        layers = list(kept[labels[-1]])
        result.append(grouped_bars(
            layers, {f"capacity {l}": [100 * kept[l][k] for k in layers] for l in labels},
            f"kept at round {summary['final']['round']} (%)", (0, 105),
            os.path.join(out, f"kept_per_layer.{fmt}")))
    partition = os.path.join(workdir, "partition.json")
    if paths.exists(partition):
        from fiarse_jax.data.summary import plot_partition
        part = json.loads(paths.read_text(partition))
        result.append(plot_partition(part, os.path.join(out, f"partition.{fmt}"),
                                     title=f"training samples per client ({config['data']['name']})"))
    return result


def plot_comparison(summaries: dict[str, dict | list[dict]], histories: dict[str, list],
                    workdir: str) -> list[str]:
    """Write the two PNGs; returns their paths. A name may map to one run's summary and
    history, or to lists of them, one per seed: then lines are the mean over seeds with a
    band of ± one standard deviation, bars carry ± std error bars."""
    plt = _pyplot()
    runs = {m: s if isinstance(s, list) else [s] for m, s in summaries.items()}
    hists = {m: h if h and isinstance(h[0], list) else [h] for m, h in histories.items()}
    first = next(iter(runs.values()))[0]
    labels = labels_by_size(first["capacities"])
    panels = [(f"capacity {l}: local test", lambda m, l=l: m["local_accuracy"][l]) for l in labels]
    panels.append(("full model: global test", lambda m: m["global_accuracy"]))
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows + 0.6), sharey=True,
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, get) in zip(axes.flat, panels):
        for method, seeds in hists.items():
            n = min(len(h) for h in seeds)   # the evaluations every seed has
            x = [m["round"] for m in seeds[0][:n]]
            ys = 100 * np.array([[get(m) for m in h[:n]] for h in seeds])
            line, = ax.plot(x, ys.mean(0), marker=".", label=method)
            if len(seeds) > 1:
                sd = ys.std(0, ddof=1)
                ax.fill_between(x, ys.mean(0) - sd, ys.mean(0) + sd, color=line.get_color(),
                                alpha=0.2, lw=0)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("accuracy (%)")
    handles, names = axes.flat[0].get_legend_handles_labels()
    seeds = max(len(s) for s in hists.values())
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), fontsize=9,
               frameon=False, title=f"mean ± 1 std over {seeds} seeds" if seeds > 1 else None,
               title_fontsize=9)
    fig.tight_layout(rect=(0, (0.65 if seeds > 1 else 0.45) / (3.2 * rows + 0.6), 1, 1))
    p1 = os.path.join(workdir, "accuracy_vs_round.png")
    paths.save_figure(fig, p1, dpi=150)
    plt.close(fig)

    local = {m: 100 * np.array([[s["final"]["local_accuracy"][l] for l in labels] for s in ss])
             for m, ss in runs.items()}
    p2 = grouped_bars(
        [f"capacity {l}" for l in labels], {m: a.mean(0) for m, a in local.items()},
        "local test accuracy (%)", (0, 100), os.path.join(workdir, "accuracy_per_capacity.png"),
        errors={m: a.std(0, ddof=1) for m, a in local.items() if len(a) > 1})
    return [p1, p2]
