"""``fiarse-jax reproduce``: the paper's comparison from one config, beside the paper's table.

``reproduce(config, workdir, variants, seeds=...)`` trains every variant of ``VARIANTS``
(or those named) with ``config`` — the same seed, partition, capacity assignment and client
schedule for all; only the method and its options change, and early-exit heads are built
only for a method that trains them (``compare.method_config``) — into
``workdir/<variant>/``, or once per seed into ``workdir/seed_<s>/<variant>/`` (a stopped
command resumes where it stopped; finished runs are read, not rerun), and writes, in
``workdir``:

* ``reproduction.md``: per variant the paper's cells — overall local (mean over clients
  of each one's accuracy on its own test split), local per size, global (the mean over
  sizes of each sub-model's accuracy on the global test set) — as ours (mean ± std over
  seeds) beside the paper's cell (``config.paper``, a key of ``PAPER``) and the gap; the
  full model; each size's global number; the parameters each size holds (equal budgets,
  with what early-exit heads hold); the paper's claims checked on paired seeds (FIARSE
  above each baseline, globally and locally; where the local gap is largest; local above
  global); and the run facts (global test order, machine, wall time);
* ``reproduction.json``: the same numbers (every seed's too), the paper's, every summary;
* ``reproduction_vs_paper.png``: ours (± std) against the paper's cells;
* the comparison plots (``accuracy_vs_round.png``, ``accuracy_per_capacity.png``).

FIARSE may appear twice: ``fiarse_tcb`` is the method as the paper's Eq. 3 and the
authors' backward define it; ``fiarse_masked`` the plain masked gradient their released
runs were made with (see ``fiarse.py``). Both stand beside the paper's FIARSE cells.
"""
from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np

from fiarse_jax.cli import compare, plots
from fiarse_jax.core.capacities import capacity_label
from fiarse_jax.experiment import config as config_lib
from fiarse_jax.experiment.config import ConfigError, validate_config
from fiarse_jax.experiment.metrics import write_atomic
from fiarse_jax.utils import paths

#: variant -> (method, config overrides, the paper's method name)
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "fiarse_tcb": ("fiarse", {"fiarse.gradient": "tcb"}, "fiarse"),
    "fiarse_masked": ("fiarse", {"fiarse.gradient": "masked"}, "fiarse"),
    "heterofl": ("heterofl", {}, "heterofl"),
    "fedrolex": ("fedrolex", {}, "fedrolex"),
    "scalefl": ("scalefl", {}, "scalefl"),
    "fedavg_smallest": ("fedavg_smallest", {}, ""),
}

#: The authors' results table (four sizes, accuracy %; ``../shared/README.md``): per method
#: the overall local number (mean over clients of each one's accuracy on its own test
#: split), the per-size local cells and the global number (the sub-models on the server
#: test set, averaged over sizes). AG News has the local and global numbers only.
#: FIARSE's CIFAR-10 local (77.04) is not the mean of its size cells (77.40): as printed.
PAPER: dict[str, dict[str, dict[str, Any]]] = {
    "cifar10_four": {
        "heterofl": {"local": 68.88, "sizes": {"1/64": 60.24, "1/16": 69.32, "1/4": 72.18,
                                               "1": 73.76}, "global": 66.05},
        "fedrolex": {"local": 67.18, "sizes": {"1/64": 54.60, "1/16": 64.96, "1/4": 70.08,
                                               "1": 79.08}, "global": 65.98},
        "scalefl": {"local": 72.10, "sizes": {"1/64": 69.04, "1/16": 71.64, "1/4": 70.08,
                                              "1": 77.64}, "global": 67.37},
        "fiarse": {"local": 77.04, "sizes": {"1/64": 73.12, "1/16": 77.20, "1/4": 77.24,
                                             "1": 82.04}, "global": 73.75}},
    "cifar100_four": {
        "heterofl": {"local": 31.75, "sizes": {"1/64": 27.24, "1/16": 29.80, "1/4": 33.52,
                                               "1": 36.44}, "global": 30.67},
        "fedrolex": {"local": 31.67, "sizes": {"1/64": 21.00, "1/16": 30.84, "1/4": 36.44,
                                               "1": 38.40}, "global": 29.89},
        "scalefl": {"local": 39.69, "sizes": {"1/64": 36.16, "1/16": 40.48, "1/4": 42.56,
                                              "1": 39.56}, "global": 37.56},
        "fiarse": {"local": 41.76, "sizes": {"1/64": 39.12, "1/16": 43.24, "1/4": 43.72,
                                             "1": 40.96}, "global": 38.63}},
    "ag_news": {
        "heterofl": {"local": 87.59, "global": 86.88},
        "fedrolex": {"local": 87.43, "global": 87.19},
        "scalefl": {"local": 88.02, "global": 87.66},
        "fiarse": {"local": 90.03, "global": 89.61}},
}

#: The baselines FIARSE's claims are checked against, in the paper's column order.
BASELINES = ("heterofl", "fedrolex", "scalefl")


def variant_configs(config, variants: Sequence[str]) -> dict[str, Any]:
    """{variant: config} (each validated before any run starts)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if not variants or unknown or len(set(variants)) != len(variants):
        raise ConfigError(f"--methods {','.join(variants)!r}: expected distinct names from "
                          f"{list(VARIANTS)}" + (f"; unknown {unknown}" if unknown else ""))
    paper = config.get("paper", "")
    if paper and paper not in PAPER:
        raise ConfigError(f"config.paper = {paper!r}: must be '' or one of {sorted(PAPER)}")
    out = {}
    for v in variants:
        method, overrides, _ = VARIANTS[v]
        cfg = compare.method_config(config, method)
        with cfg.unlocked():
            for field, value in overrides.items():
                *parents, leaf = field.split(".")
                node = cfg
                for p in parents:
                    node = node[p]
                node[leaf] = value
        try:
            validate_config(cfg)
        except ConfigError as e:
            raise ConfigError(f"variant {v!r}: {e}") from None
        out[v] = cfg
    return out


def overall_local(final: dict, clients_per_level: dict[str, int], labels: Sequence[str]) -> float:
    """The paper's overall local number: the mean over clients of each client's accuracy on
    its own test split (the per-size client means weighted by clients per size)."""
    n = np.array([clients_per_level[l] for l in labels], float)
    acc = np.array([final["local_accuracy_client_mean"][l] for l in labels])
    return float((n * acc).sum() / n.sum())


def held_in_exits(summary: dict, labels: Sequence[str]) -> dict[str, int | None]:
    """Per size, the maskable parameters the sub-model holds in early-exit heads (module
    names starting with ``exit``, any case): what a method without a readout there would
    waste of its budget. None per size for a summary written before ``maskable_per_layer``
    existed."""
    if "maskable_per_layer" not in summary:
        return {l: None for l in labels}
    sizes = summary["maskable_per_layer"]
    kept = summary["kept_fraction_per_layer"]
    return {l: int(round(sum(kept[l].get(k, 0.0) * n for k, n in sizes.items()
                             if k.lower().startswith("exit")))) for l in labels}


def numbers(summaries: dict[str, dict], labels: Sequence[str], paper_key: str) -> dict:
    """One seed's numbers per variant (%): ``local`` (overall), ``sizes`` (local per size),
    ``global`` (mean over sizes), ``capacity_global`` (per size), ``full_model``; the
    budget (``params_held``, ``kept_fraction``, ``exit_params_held``) and the paper's cells."""
    cells = PAPER.get(paper_key, {})
    out = {}
    for v, s in summaries.items():
        f = s["final"]
        ref = cells.get(VARIANTS[v][2], {})
        out[v] = {
            "local": 100 * overall_local(f, s["clients_per_level"], labels),
            "sizes": {l: 100 * f["local_accuracy_client_mean"][l] for l in labels},
            "global": 100 * float(np.mean([f["capacity_global_accuracy"][l] for l in labels])),
            "capacity_global": {l: 100 * f["capacity_global_accuracy"][l] for l in labels},
            "full_model": 100 * f["global_accuracy"],
            "params_held": {l: s["costs"][l]["params_held"] for l in labels},
            "kept_fraction": {l: s["kept_fraction"][l] for l in labels},
            "exit_params_held": held_in_exits(s, labels),
            "paper": {"local": ref.get("local"),
                      "sizes": {l: ref.get("sizes", {}).get(l) for l in labels},
                      "global": ref.get("global")},
        }
    return out


ACCURACIES = ("local", "sizes", "global", "capacity_global", "full_model")


def aggregate(per_seed: dict[Any, dict]) -> dict:
    """Numbers over seeds: per variant (every variant that ran in some seed), each accuracy
    as ``{"mean", "std", "seeds"}`` over the seeds it ran in (std: the sample standard
    deviation, ddof = 1; 0 for one seed) — nested per size where the numbers are; budgets
    and paper cells from the first seed it ran in (the same in every seed up to a draw's
    ties)."""
    seeds = list(per_seed)
    variants = list(dict.fromkeys(v for s in seeds for v in per_seed[s]))   # first-seen order
    out = {}
    for v in variants:
        have = [per_seed[s][v] for s in seeds if v in per_seed[s]]
        entry = {k: have[0][k] for k in have[0] if k not in ACCURACIES}
        for k in ACCURACIES:
            if isinstance(have[0][k], dict):
                entry[k] = {l: spread([h[k][l] for h in have]) for l in have[0][k]}
            else:
                entry[k] = spread([h[k] for h in have])
        entry["num_seeds"] = len(have)
        out[v] = entry
    return out


def spread(values: Sequence[float]) -> dict:
    """``{"mean", "std" (ddof = 1; 0 for one value), "seeds": values}``."""
    a = np.asarray(values, float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "seeds": [float(x) for x in a]}


def _cell(ours: dict | None, paper: float | None, multi: bool) -> str:
    """'ours' or 'mean ± std' (a variant that ran in one seed of several: 'x (1 seed)'),
    then '(paper, gap)' where the paper has the cell."""
    if ours is None:
        return "—"
    spread_text = (f" ± {ours['std']:.2f}" if len(ours["seeds"]) > 1 else " (1 seed)")
    text = f"{ours['mean']:.2f}" + (spread_text if multi else "")
    if paper is None:
        return text
    return f"{text} ({paper:.2f}, {ours['mean'] - paper:+.2f})"


def paired(per_seed: dict[Any, dict], a: str, b: str, get) -> dict | None:
    """``get(numbers[a]) − get(numbers[b])`` in every seed both ran (same partition,
    initialisation and schedule: a paired difference), as ``spread``; None if none."""
    d = [get(n[a]) - get(n[b]) for n in per_seed.values() if a in n and b in n]
    return spread(d) if d else None


def _diff(d: dict, multi: bool) -> str:
    text = f"{d['mean']:+.2f}" + (f" ± {d['std']:.2f}" if multi else "")
    if multi:
        text += f", above in {sum(x > 0 for x in d['seeds'])} of {len(d['seeds'])} seeds"
    return text


def direction(per_seed: dict[Any, dict], labels: Sequence[str], paper_key: str = "") -> list[str]:
    """The paper's claims checked on these numbers, one sentence each (a nested one
    indented by two spaces): FIARSE's global and local numbers above every baseline's
    (paired differences over seeds, mean ± std); the gap over each baseline per size on
    the local cells, and where it is largest (the paper: at the smallest size for
    HeteroFL and FedRolex); local above global for every variant, as in the paper."""
    cells = PAPER.get(paper_key, {})
    multi = len(per_seed) > 1
    present = set().union(*(n.keys() for n in per_seed.values()))
    lines = []
    fiarse = [v for v in ("fiarse_tcb", "fiarse_masked") if v in present]
    for base in BASELINES:
        if base not in present:
            continue
        ref = cells.get("fiarse", {}), cells.get(base, {})
        for v in fiarse:
            for what in ("global", "local"):
                d = paired(per_seed, v, base, lambda n, w=what: n[w])
                if d is None:
                    continue
                paper = (f" (paper: {ref[0][what] - ref[1][what]:+.2f})"
                         if ref[0].get(what) is not None and ref[1].get(what) is not None
                         else "")
                lines.append(f"`{v}` − `{base}`, {what}: {_diff(d, multi)}{paper}.")
            gaps = [paired(per_seed, v, base, lambda n, l=l: n["sizes"][l]) for l in labels]
            if any(g is None for g in gaps):
                continue
            largest = labels[int(np.argmax([g["mean"] for g in gaps]))]
            text = (f"  per size, local ({', '.join(labels)}): "
                    + ", ".join(_diff(g, multi).split(",")[0] for g in gaps)
                    + f"; largest at {largest}")
            if all(l in r.get("sizes", {}) for r in ref for l in labels):
                pg = [ref[0]["sizes"][l] - ref[1]["sizes"][l] for l in labels]
                text += (f" (paper: {', '.join(f'{g:+.2f}' for g in pg)}; largest at "
                         f"{labels[int(np.argmax(pg))]})")
            lines.append(text + ".")
    agg = aggregate(per_seed)
    above = [v for v, n in agg.items() if n["local"]["mean"] > n["global"]["mean"]]
    lines.append("Local above global (as in the paper, for every method): "
                 + (", ".join(f"`{v}`" for v in above) if above else "none")
                 + "; " + ", ".join(f"`{v}` {n['local']['mean'] - n['global']['mean']:+.2f}"
                                    for v, n in agg.items()) + " points.")
    return lines


def markdown(per_seed: dict[Any, dict], labels: Sequence[str], failures: dict[str, str],
             paper_key: str, facts: dict) -> str:
    """reproduction.md (see module docstring)."""
    agg = aggregate(per_seed)
    multi = len(per_seed) > 1
    how = f"mean ± std over {len(per_seed)} seeds" if multi else "one seed"
    head = (["variant", "local"] + [f"local {l}" for l in labels]
            + ["global (mean over sizes)", "full model"])
    rows = [f"# Reproduction: {facts['data']} — ours ({how}); (paper, ours − paper)", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, n in agg.items():
        p = n["paper"]
        rows.append("| " + " | ".join(
            [f"`{v}`", _cell(n["local"], p["local"], multi)]
            + [_cell(n["sizes"][l], p["sizes"][l], multi) for l in labels]
            + [_cell(n["global"], p["global"], multi), _cell(n["full_model"], None, multi)])
            + " |")
    for v, e in failures.items():
        rows.append("| " + " | ".join([f"`{v}`", f"**failed**: {e}"] + [""] * (len(head) - 2))
                    + " |")
    rows += ["", f"Each size's sub-model on the global test set ({facts.get('global test', '')};"
             " the global column above is their mean):", "",
             "| variant | " + " | ".join(f"global {l}" for l in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for v, n in agg.items():
        rows.append(f"| `{v}` | " + " | ".join(_cell(n["capacity_global"][l], None, multi)
                                             for l in labels) + " |")
    rows += ["", "Parameters held per size: all held (every parameter a client stores), the "
             "maskable share (the budget), and the maskable ones in early-exit heads (only "
             "`scalefl` trains heads; the other variants are built without them).", "",
             "| variant | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for v, n in agg.items():
        rows.append(f"| `{v}` | " + " | ".join(
            f"{n['params_held'][l]:,} ({100 * n['kept_fraction'][l]:.2f} %; heads "
            + ("n/a" if n["exit_params_held"][l] is None else f"{n['exit_params_held'][l]:,}")
            + ")" for l in labels) + " |")
    rows += ["", "## Direction of the paper's claims", ""]
    rows += [f"- {l}" if not l.startswith("  ") else f"  - {l.strip()}"
             for l in direction(per_seed, labels, paper_key)]
    rows += ["", "## Run", ""] + [f"- {k}: {v}" for k, v in facts.items()]
    rows += ["", "Paper cells: " + (f"`{paper_key}` (the authors' results table; FIARSE's "
                                     "cells stand beside both of our FIARSE variants)"
                                     if paper_key else "none (config.paper is empty)")]
    return "\n".join(rows) + "\n"


def plot_vs_paper(agg: dict, labels: Sequence[str], path: str) -> str:
    """Ours (bars, ± std over seeds as error bars) and the paper's cells (black ticks):
    overall local, local per size and global."""
    plt = plots._pyplot()
    groups = ["local"] + [f"local {l}" for l in labels] + ["global"]
    fig, ax = plt.subplots(figsize=(3 + 1.3 * len(groups), 3.8))
    width = 0.8 / max(1, len(agg))
    for i, (v, n) in enumerate(agg.items()):
        cells = [n["local"]] + [n["sizes"][l] for l in labels] + [n["global"]]
        p = n["paper"]
        ref = [p["local"]] + [p["sizes"][l] for l in labels] + [p["global"]]
        xs = np.arange(len(groups)) + i * width - 0.4 + width / 2
        ax.bar(xs, [c["mean"] for c in cells], width, label=v,
               yerr=[c["std"] for c in cells] if n["num_seeds"] > 1 else None,
               error_kw={"elinewidth": 1, "capsize": 2})
        for x, r in zip(xs, ref):
            if r is not None:
                ax.plot([x - width / 2, x + width / 2], [r, r], "k-", lw=2)
    ax.plot([], [], "k-", lw=2, label="paper")
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    plots._save(fig, path)
    return path


def reproduce(config, workdir: str, variants: Sequence[str] | None = None, *,
              seeds: Sequence[int] | None = None, progress: bool | None = None,
              overwrite: bool = False) -> dict[str, Any]:
    """Train the variants (once per seed of ``seeds``, into ``workdir/seed_<s>/``; None:
    the config's seed, into ``workdir``; ``overwrite``: every run starts over instead of
    resuming) and write the report (see module docstring)."""
    variants = list(variants or VARIANTS)
    configs = variant_configs(config, variants)
    runs = compare.run_seeds(configs, workdir, seeds, progress=progress, overwrite=overwrite)
    labels = [capacity_label(c) for c in sorted(config.capacities)]
    paper_key = config.get("paper", "")
    per_seed = {s: numbers(summaries, labels, paper_key) for s, (summaries, _, _) in runs.items()}
    per_seed = {s: n for s, n in per_seed.items() if n}
    failures = {(v if s is None else f"{v} (seed {s})"): e
                for s, (_, _, fails) in runs.items() for v, e in fails.items()}
    all_summaries = {s: summaries for s, (summaries, _, _) in runs.items()}
    facts = run_facts(config, configs, all_summaries, labels, seeds)
    paths.makedirs(workdir)
    text = markdown(per_seed, labels, failures, paper_key, facts) if per_seed else \
        "# Reproduction: every run failed\n\n" + "\n".join(f"- {v}: {e}" for v, e in
                                                           failures.items()) + "\n"
    write_atomic(os.path.join(workdir, "reproduction.md"), text)
    pngs = []
    if per_seed:
        agg = aggregate(per_seed)
        pngs.append(plot_vs_paper(agg, labels, os.path.join(workdir, "reproduction_vs_paper.png")))
        pngs += plots.plot_comparison(*compare.by_name(runs), workdir)
    else:
        agg = {}
    single = seeds is None
    result = {"variants": variants, "labels": labels, "paper": paper_key, "seeds": seeds,
              "numbers": agg, "numbers_per_seed": {str(s): n for s, n in per_seed.items()},
              "failures": failures, "facts": facts, "plots": pngs, "table": text,
              "summaries": all_summaries[None] if single else
              {str(s): v for s, v in all_summaries.items()}}
    write_atomic(os.path.join(workdir, "reproduction.json"),
                 json.dumps(result, indent=2, default=str))
    return result


def disconnected_note(summaries: dict) -> str:
    """Which variants' levels started with no weight at a layer with no skip around it
    (``summary["disconnected_at_start"]``, ``connectivity``), in how many seeds."""
    found: dict[tuple[str, str, str], int] = {}
    missing = [v for per in summaries.values() for v, s in per.items()
               if "disconnected_at_start" not in s]
    if missing:
        return "not recorded (runs made before summaries recorded it)"
    for per in summaries.values():
        for v, s in per.items():
            for label, cuts in s.get("disconnected_at_start", {}).items():
                key = (v, label, ", ".join(cuts))
                found[key] = found.get(key, 0) + 1
    if not found:
        return "no level of any run (every sub-model held a path from input to output)"
    n = len(summaries)
    return "; ".join(f"`{v}` {label} at {cuts}" + (f" ({k} of {n} seeds)" if n > 1 else "")
                     for (v, label, cuts), k in found.items()) + \
        " (global-scope θ over initial magnitudes; training reconnects it)"


def run_facts(config, configs: dict, summaries: dict, labels: Sequence[str],
              seeds: Sequence[int] | None) -> dict[str, str]:
    """The report's facts: data, federation, model, schedule, machine, seeds, wall time."""
    done = [s for per in summaries.values() for s in per.values()]
    first = done[0] if done else {}
    order = config.get("eval", {}).get("global_order", "clients")
    fields = {v: dict(c.model.items()) for v, c in configs.items()}
    first_fields = next(iter(fields.values()))
    common = {k: x for k, x in first_fields.items()
              if all(f.get(k, object()) == x for f in fields.values())}
    odd = {v: {k: x for k, x in f.items() if k not in common} for v, f in fields.items()}
    model = ", ".join(f"{k}={x}" for k, x in common.items()) + "".join(
        f"; `{v}`: " + ", ".join(f"{k}={x}" for k, x in o.items()) for v, o in odd.items() if o)
    return {
        "data": f"{config.data.name} ({config.data.get('data_dir') or 'built in'})",
        "federation": f"{config.data.num_clients} clients, {config.clients_per_round} per "
                      f"round, partition {config.data.get('partition', 'dirichlet')} "
                      f"(α = {config.data.alpha}), sizes {', '.join(labels)}",
        "global test": (f"{first.get('global_test', {}).get('samples', '?')} samples: "
                        + ("every client's test split in client order, the authors'"
                           if order == "clients" else "the dataset's test split in its own "
                           "order (pooled clients' tests in a fixed mixed order where the "
                           "partition leaves no test split whole)")
                        + f" (eval.global_order = {order!r})"),
        "model": model,
        "schedule": f"{config.num_rounds} rounds, K = {config.client.local_steps} "
                    f"{config.client.optimizer} steps (lr {config.client.learning_rate}, batch "
                    f"{config.client.batch_size}); evaluation batch "
                    f"{config_lib.eval_batch_size(config)}",
        "seeds": ", ".join(str(s) for s in seeds) if seeds else f"{config.seed} (the config's)",
        "cut off at round 0": disconnected_note(summaries),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"backend {first.get('backend', '?')} (strategy {first.get('strategy', '?')})",
        "wall time": (f"{sum(s['wall_time_s'] for s in done) / 60:.1f} min in all; per run: "
                      + ", ".join(f"{v}{'' if s is None else f' (seed {s})'} "
                                  f"{x['wall_time_s'] / 60:.1f} min"
                                  for s, per in summaries.items() for v, x in per.items())),
    }
