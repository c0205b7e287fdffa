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

A method that fails (diverges, runs out of memory, ...) does not lose the others: its
row says it failed and why, the others finish, and the command exits with status 1.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from fiarse_jax import evaluate, paths, plots, policies, train
from fiarse_jax.config import ConfigError, validate_config
from fiarse_jax.metrics import read_jsonl, write_atomic


def _method_config(config, method: str):
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.method = method
    return cfg


def _fmt_int(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else (f"{n / 1e3:.1f}k" if n >= 1e4 else f"{n:,.0f}")


def markdown_table(summaries: dict[str, dict], failures: dict[str, str] | None = None,
                   labels: Sequence[str] | None = None) -> str:
    """The comparison table (capacities smallest first, as in the paper); a failed run
    is a row saying so, with its error (``failures``: name -> one-line reason)."""
    failures = failures or {}
    labels = labels or plots.by_size(next(iter(summaries.values()))["capacities"])
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
    for method, error in failures.items():
        rows.append("| " + " | ".join([f"`{method}`", f"**failed**: {_cell(error)}"]
                                      + [""] * (len(head) - 2)) + " |")
    return "\n".join(rows) + "\n"


def _cell(text: str) -> str:
    """``text`` on one line, safe inside a markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def failure_reason(e: BaseException) -> str:
    """One line: the exception's type and message."""
    return _cell(f"{type(e).__name__}: {e}")[:500]


def run_all(configs: dict[str, Any], workdir: str, *, progress: bool | None = None
            ) -> tuple[dict[str, dict], dict[str, list], dict[str, str]]:
    """Train every ``{name: config}`` into ``workdir/<name>/`` (resuming what a killed
    command left); (summaries, histories, failures) by name. A run that raises is
    recorded in ``failures`` and the others go on."""
    summaries, histories, failures = {}, {}, {}
    for name, cfg in configs.items():
        run_dir = os.path.join(workdir, name)
        try:
            summaries[name] = train.train_and_evaluate(cfg, run_dir, progress=progress)
        except Exception as e:   # noqa: BLE001 — any failure: the others still run
            failures[name] = failure_reason(e)
            print(f"fiarse-jax: {name} failed: {failures[name]}", file=sys.stderr, flush=True)
            continue
        histories[name] = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    return summaries, histories, failures


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
    summaries, histories, failures = run_all(configs, workdir, progress=progress)
    labels = [evaluate.capacity_label(c) for c in sorted(config.capacities)]
    table = markdown_table(summaries, failures, labels)
    paths.makedirs(workdir)
    write_atomic(os.path.join(workdir, "comparison.md"), table)
    pngs = plots.plot_comparison(summaries, histories, workdir) if summaries else []
    result = {"methods": methods, "table": table, "plots": pngs, "summaries": summaries,
              "failures": failures}
    write_atomic(os.path.join(workdir, "comparison.json"),
                 json.dumps(result, indent=2, default=str))
    return result
