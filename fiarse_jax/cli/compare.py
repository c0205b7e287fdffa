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

from fiarse_jax import policies
from fiarse_jax.cli import plots
from fiarse_jax.core.capacities import by_size, capacity_label
from fiarse_jax.experiment import train, workdir_lock
from fiarse_jax.experiment.config import ConfigError, validate_config
from fiarse_jax.experiment.metrics import read_jsonl, write_atomic
from fiarse_jax.utils import paths


def method_config(config, method: str):
    """``config`` for one method of a comparison. A model built
    with early-exit heads keeps them only for a method that trains them
    (``policies.uses_exits``): for the others the heads never change, and their initial
    magnitudes would take a share of every level's budget (15 % at 1/64 on the CPU
    reproduction's ResNet). Flax draws each module's initial values from its own name, so
    the other parameters start the same either way (tested)."""
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.method = method
        if cfg.model.get("early_exits", False) and not policies.uses_exits(method):
            cfg.model.early_exits = False
    return cfg


def _fmt_int(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else (f"{n / 1e3:.1f}k" if n >= 1e4 else f"{n:,.0f}")


def _pct(values: Sequence[float]) -> str:
    """One run's value (a fraction) as '12.34', several seeds' as 'mean ± std' (ddof = 1)."""
    a = 100 * np.asarray(values, float)
    return f"{a[0]:.2f}" if len(a) == 1 else f"{a.mean():.2f} ± {a.std(ddof=1):.2f}"


def markdown_table(summaries: dict[str, dict | list[dict]], failures: dict[str, str] | None = None,
                   labels: Sequence[str] | None = None) -> str:
    """The comparison table (capacities smallest first, as in the paper); a failed run
    is a row saying so, with its error (``failures``: name -> one-line reason). A name
    with a list of summaries (one per seed) shows every accuracy as mean ± std; its costs
    are the first seed's."""
    failures = failures or {}
    runs = {m: s if isinstance(s, list) else [s] for m, s in summaries.items()}
    labels = labels or by_size(next(iter(runs.values()))[0]["capacities"])
    head = (["method"] + [f"local {l}" for l in labels] + ["global (mean over sizes)", "full model"]
            + ["params held (" + " / ".join(labels) + ")", "forward FLOPs (" + " / ".join(labels) + ")",
               "FLOPs counted on"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, ss in runs.items():
        fs, c = [s["final"] for s in ss], ss[0]["costs"]
        glob = [np.mean([f["capacity_global_accuracy"][l] for l in labels]) for f in fs]
        cells = ([f"`{method}`"] + [_pct([f["local_accuracy"][l] for f in fs]) for l in labels]
                 + [_pct(glob), _pct([f["global_accuracy"] for f in fs]),
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


def parse_seeds(value: str | Sequence[str] | None) -> list[int] | None:
    """``--seeds`` ('0,1,2' or absl's list) -> [0, 1, 2]; None when not given. Empty,
    non-integer, negative or repeated values are a ``ConfigError`` of one line naming
    the value, raised before any run starts."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    shown = ",".join(str(i) for i in items)
    items = [str(i).strip() for i in items]
    if not items or any(i == "" for i in items):
        raise ConfigError(f"--seeds {shown!r}: expected distinct non-negative integers, "
                          "comma-separated (e.g. --seeds 0,1,2)")
    seeds = []
    for i in items:
        try:
            seed = int(i)
        except ValueError:
            raise ConfigError(f"--seeds {shown!r}: {i!r} is not an integer") from None
        if seed < 0:
            raise ConfigError(f"--seeds {shown!r}: {seed} is negative (seeds are ≥ 0)")
        if seed in seeds:
            raise ConfigError(f"--seeds {shown!r}: {seed} is listed twice")
        seeds.append(seed)
    return seeds


#: Fields a finished run may differ in and still be read back by a rerun command: how it
#: was computed and saved, not what it measured (every ``eval*`` field must match).
REUSE_MAY_DIFFER = ("checkpoint_every", "keep_checkpoints", "tensorboard", "profile", "paper",
                    "engine.strategy", "engine.clients_per_chunk", "engine.reduce",
                    "engine.memory_budget_gb", "engine.xla", "engine.rounds_per_program",
                    "model.conv")


def finished_summary(run_dir: str, config) -> dict | None:
    """The summary of a run already finished in ``run_dir`` with ``config`` (the same
    fields up to ``REUSE_MAY_DIFFER``, evaluated on the same global test order, all
    ``num_rounds`` done), else None: a rerun command takes it as it is instead of
    rebuilding the run."""
    from fiarse_jax.experiment.checkpoint import config_differences
    path = os.path.join(run_dir, "summary.json")
    if not paths.exists(path):
        return None
    try:
        summary = json.loads(paths.read_text(path))
    except (OSError, ValueError):
        return None
    saved = summary.get("config", {})
    order = config.get("eval", {}).get("global_order", "clients")
    if (saved.get("num_rounds") != config.num_rounds
            or summary.get("final", {}).get("round") != config.num_rounds
            or summary.get("global_test", {}).get("order") != order
            or config_differences(saved, config.to_dict(), REUSE_MAY_DIFFER)):
        return None
    return summary


def run_all(configs: dict[str, Any], workdir: str, *, progress: bool | None = None,
            overwrite: bool = False) -> tuple[dict[str, dict], dict[str, list], dict[str, str]]:
    """Train every ``{name: config}`` into ``workdir/<name>/`` (resuming what a killed
    command left; a run already finished with the same config is read, not rerun;
    ``overwrite``: every run starts over); (summaries, histories, failures) by name. A run
    that raises is recorded in ``failures`` and the others go on."""
    summaries, histories, failures = {}, {}, {}
    for name, cfg in configs.items():
        run_dir = os.path.join(workdir, name)
        try:
            summaries[name] = ((not overwrite and finished_summary(run_dir, cfg))
                               or train.train_and_evaluate(cfg, run_dir, progress=progress,
                                                           overwrite=overwrite))
        except workdir_lock.WorkdirBusy:   # another command works here: stop, do not race it
            raise
        except Exception as e:   # noqa: BLE001 — any failure: the others still run
            failures[name] = failure_reason(e)
            print(f"fiarse-jax: {name} failed: {failures[name]}", file=sys.stderr, flush=True)
            continue
        histories[name] = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    return summaries, histories, failures


def run_seeds(configs: dict[str, Any], workdir: str, seeds: Sequence[int] | None, *,
              progress: bool | None = None, overwrite: bool = False
              ) -> dict[int | None, tuple[dict, dict, dict]]:
    """``run_all`` once per seed, seed by seed (a stopped command leaves whole seeds): every
    config with ``seed`` set — partition, initialisation and client sampling all follow
    it — into ``workdir/seed_<seed>/<name>/``. ``seeds`` None: the configs' own seed,
    into ``workdir/<name>/`` (key None). ``{seed: (summaries, histories, failures)}``."""
    if seeds is None:
        return {None: run_all(configs, workdir, progress=progress, overwrite=overwrite)}
    seeds = parse_seeds([str(s) for s in seeds])
    out = {}
    for seed in seeds:
        seeded = {}
        for name, cfg in configs.items():
            seeded[name] = cfg.copy_and_resolve_references()
            with seeded[name].unlocked():
                seeded[name].seed = int(seed)
        out[seed] = run_all(seeded, os.path.join(workdir, f"seed_{seed}"), progress=progress,
                            overwrite=overwrite)
    return out


def by_name(runs: dict[Any, tuple[dict, dict, dict]]) -> tuple[dict[str, list], dict[str, list]]:
    """``run_seeds``' result as ({name: [summary per seed]}, {name: [history per seed]}),
    the seeds a name ran in, in order."""
    summaries: dict[str, list] = {}
    histories: dict[str, list] = {}
    for done, hist, _ in runs.values():
        for name, s in done.items():
            summaries.setdefault(name, []).append(s)
            histories.setdefault(name, []).append(hist[name])
    return summaries, histories


def compare(config, methods: Sequence[str], workdir: str, *, seeds: Sequence[int] | None = None,
            progress: bool | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train every method in ``methods`` under ``config`` (once per seed of ``seeds``, into
    ``workdir/seed_<s>/<method>/``; None: the config's seed, into ``workdir/<method>/``);
    write table (mean ± std over seeds), JSON (every seed's summaries) and plots."""
    methods = list(methods)
    unknown = [m for m in methods if m not in policies.POLICIES]
    if not methods or unknown:
        raise ConfigError(f"--methods {','.join(methods)!r}: unknown {unknown}; "
                          f"expected a comma-separated list from {sorted(policies.POLICIES)}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods {','.join(methods)!r}: a method is listed twice")
    configs = {m: method_config(config, m) for m in methods}
    for cfg in configs.values():       # every config checked before any run starts
        validate_config(cfg)
    runs = run_seeds(configs, workdir, seeds, progress=progress, overwrite=overwrite)
    summaries, histories = by_name(runs)
    failures = {(m if s is None else f"{m} (seed {s})"): e
                for s, (_, _, fails) in runs.items() for m, e in fails.items()}
    labels = [capacity_label(c) for c in sorted(config.capacities)]
    table = markdown_table(summaries, failures, labels)
    paths.makedirs(workdir)
    write_atomic(os.path.join(workdir, "comparison.md"), table)
    pngs = plots.plot_comparison(summaries, histories, workdir) if summaries else []
    result = {"methods": methods, "seeds": seeds, "table": table, "plots": pngs,
              "summaries": ({m: s[0] for m, s in summaries.items()} if seeds is None else
                            {str(seed): done for seed, (done, _, _) in runs.items()}),
              "failures": failures}
    write_atomic(os.path.join(workdir, "comparison.json"),
                 json.dumps(result, indent=2, default=str))
    return result
