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

from fiarse_jax import plots, policies, train
from fiarse_jax.config import ConfigError, validate_config
from fiarse_jax.metrics import read_jsonl


def _method_config(config, method: str):
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.method = method
    return cfg


def _fmt_int(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else (f"{n / 1e3:.1f}k" if n >= 1e4 else f"{n:,.0f}")


def markdown_table(summaries: dict[str, dict]) -> str:
    """The comparison table (capacities smallest first, as in the paper)."""
    labels = plots.by_size(next(iter(summaries.values()))["capacities"])
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
        histories[m] = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    table = markdown_table(summaries)
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(table)
    pngs = plots.plot_comparison(summaries, histories, workdir)
    result = {"methods": methods, "table": table, "plots": pngs, "summaries": summaries}
    with open(os.path.join(workdir, "comparison.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    return result
