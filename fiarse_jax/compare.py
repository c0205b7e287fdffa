"""Run several methods on the same seed, partition and client schedule; tabulate and plot.

``compare(config, methods, workdir)`` trains each method with ``config`` (only
``config.method`` changes, so the Dirichlet partition, the capacity assignment
and the per-round client sample are identical) into ``workdir/<method>/`` and
writes, in ``workdir``:

* ``comparison.md``: the paper-style table — local accuracy per capacity (own
  clients' test splits), "global" = mean over capacities of each sub-model's
  accuracy on the pooled test set (the paper's global number), the full model —
  plus cost columns (parameters held and forward FLOPs per capacity);
* ``comparison.json``: the same numbers and every run's summary;
* ``accuracy_vs_round.png``: local accuracy per capacity and full-model accuracy
  against rounds, one line per method;
* ``accuracy_per_capacity.png``: local accuracy per capacity, one bar per method.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from fiarse_jax import policies, train
from fiarse_jax.config import ConfigError, validate_config


def _method_config(config, method: str):
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.method = method
    return cfg


def _fmt_int(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else (f"{n / 1e3:.1f}k" if n >= 1e4 else f"{n:,.0f}")


def markdown_table(summaries: dict[str, dict]) -> str:
    """The comparison table (capacities smallest first, as in the paper)."""
    first = next(iter(summaries.values()))
    labels = sorted(first["capacities"], key=lambda k: first["capacities"][k])
    head = (["method"] + [f"local {l}" for l in labels] + ["global (mean over sizes)", "full model"]
            + ["params held (" + " / ".join(labels) + ")", "forward FLOPs (" + " / ".join(labels) + ")",
               "FLOPs counted on"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, s in summaries.items():
        f, c = s["final"], s["costs"]
        glob = np.mean([f["capacity_global_accuracy"][l] for l in labels])
        cells = ([f"`{method}`"] + [f"{100 * f['local_accuracy'][l]:.2f}" for l in labels]
                 + [f"{100 * glob:.2f}", f"{100 * f['global_accuracy']:.2f}",
                    " / ".join(_fmt_int(c[l]["params_held"]) for l in labels),
                    " / ".join(_fmt_int(c[l]["flops"]) for l in labels),
                    c[labels[0]]["flops_basis"]])
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot_comparison(summaries: dict[str, dict], histories: dict[str, list], workdir: str) -> list[str]:
    """Write the two PNGs; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(summaries.values()))
    labels = sorted(first["capacities"], key=lambda k: first["capacities"][k])
    panels = [(f"capacity {l}: local test", lambda m, l=l: m["local_accuracy"][l]) for l in labels]
    panels.append(("full model: global test", lambda m: m["global_accuracy"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), sharey=True)
    for ax, (title, get) in zip(np.atleast_1d(axes), panels):
        for method, hist in histories.items():
            ax.plot([m["round"] for m in hist], [100 * get(m) for m in hist], marker=".", label=method)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("accuracy (%)")
    np.atleast_1d(axes)[-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    p1 = os.path.join(workdir, "accuracy_vs_round.png")
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(3.2 + 0.45 * len(labels) * len(summaries), 3.6))
    width = 0.8 / len(summaries)
    for i, (method, s) in enumerate(summaries.items()):
        ax.bar(np.arange(len(labels)) + i * width - 0.4 + width / 2,
               [100 * s["final"]["local_accuracy"][l] for l in labels], width, label=method)
    ax.set_xticks(np.arange(len(labels)), [f"capacity {l}" for l in labels])
    ax.set_ylabel("local test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    p2 = os.path.join(workdir, "accuracy_per_capacity.png")
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def compare(config, methods: Sequence[str], workdir: str, *,
            progress: bool | None = None) -> dict[str, Any]:
    """Train every method in ``methods`` under ``config``; write table, JSON and plots."""
    methods = list(methods)
    unknown = [m for m in methods if m not in policies.POLICIES]
    if not methods or unknown:
        raise ConfigError(f"--methods {','.join(methods)!r}: unknown {unknown}; "
                          f"expected a comma-separated list from {sorted(policies.POLICIES)}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods {','.join(methods)!r}: a method is listed twice")
    configs = {m: _method_config(config, m) for m in methods}
    for cfg in configs.values():       # every config checked before any run starts
        validate_config(cfg)
    summaries, histories = {}, {}
    for m, cfg in configs.items():
        run_dir = os.path.join(workdir, m)
        summaries[m] = train.train_and_evaluate(cfg, run_dir, progress=progress)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            histories[m] = [json.loads(line) for line in f]
    table = markdown_table(summaries)
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(table)
    plots = plot_comparison(summaries, histories, workdir)
    result = {"methods": methods, "table": table, "plots": plots, "summaries": summaries}
    with open(os.path.join(workdir, "comparison.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    return result
