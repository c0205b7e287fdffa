"""``fiarse-jax reproduce``: the paper's comparison from one config, beside the paper's numbers.

``reproduce(config, workdir)`` trains every variant of ``VARIANTS`` (or those named)
with ``config`` — the same seed, partition, capacity assignment and client schedule for
all; only the method and its options change — into ``workdir/<variant>/`` (a killed
command resumes where it stopped) and writes, in ``workdir``:

* ``reproduction.md``: per variant the local accuracy per size (the mean over that
  size's clients of each client's accuracy on its own test split, the paper's per-size
  local number) and the global number (the mean over sizes of each sub-model's accuracy
  on the global test set, the paper's), each beside the paper's cell where the paper
  has one (``config.paper``, a key of ``PAPER``) and the gap; then the parameters each
  size holds (equal budgets), the direction checks and the run facts;
* ``reproduction.json``: the same numbers, the paper's, and every run's summary;
* ``reproduction_vs_paper.png``: ours against the paper's, per size and global;
* the comparison plots (``accuracy_vs_round.png``, ``accuracy_per_capacity.png``).

FIARSE appears twice: ``fiarse_tcb`` is the method as the paper's Eq. 3 and the authors'
backward define it; ``fiarse_masked`` the plain masked gradient their released runs were
made with (see ``fiarse.py``). Both stand beside the paper's FIARSE cells.
"""
from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np

from fiarse_jax import compare, evaluate, paths, plots
from fiarse_jax.config import ConfigError, validate_config
from fiarse_jax.metrics import write_atomic

#: variant -> (method, config overrides, the paper's method name)
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "fiarse_tcb": ("fiarse", {"fiarse.gradient": "tcb"}, "fiarse"),
    "fiarse_masked": ("fiarse", {"fiarse.gradient": "masked"}, "fiarse"),
    "heterofl": ("heterofl", {}, "heterofl"),
    "fedrolex": ("fedrolex", {}, "fedrolex"),
    "scalefl": ("scalefl", {}, "scalefl"),
    "fedavg_smallest": ("fedavg_smallest", {}, ""),
}

#: The paper's Table 1/2 cells (four sizes, accuracy %): per-size local accuracy and the
#: global number. Only FIARSE has per-size cells; the baselines have the global one.
PAPER: dict[str, dict[str, dict[str, Any]]] = {
    "cifar10_four": {
        "fiarse": {"local": {"1/64": 73.12, "1/16": 77.20, "1/4": 77.24, "1": 82.04},
                   "global": 73.75},
        "heterofl": {"global": 66.05}, "fedrolex": {"global": 65.98},
        "scalefl": {"global": 67.37}},
    "cifar100_four": {
        "fiarse": {"local": {"1/64": 39.12, "1/16": 43.24, "1/4": 43.72, "1": 40.96},
                   "global": 38.63},
        "heterofl": {"global": 30.67}, "fedrolex": {"global": 29.89},
        "scalefl": {"global": 37.56}},
}


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
        cfg = config.copy_and_resolve_references()
        with cfg.unlocked():
            cfg.method = method
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


def _gap(ours: float | None, paper: float | None) -> str:
    if ours is None:
        return "—"
    if paper is None:
        return f"{ours:.2f}"
    return f"{ours:.2f} ({paper:.2f}, {ours - paper:+.2f})"


def numbers(summaries: dict[str, dict], labels: Sequence[str], paper_key: str) -> dict:
    """Per variant: ours and the paper's local accuracy per size and global number (%)."""
    cells = PAPER.get(paper_key, {})
    out = {}
    for v, s in summaries.items():
        f = s["final"]
        ref = cells.get(VARIANTS[v][2], {})
        out[v] = {
            "local": {l: 100 * f["local_accuracy_client_mean"][l] for l in labels},
            "global": 100 * float(np.mean([f["capacity_global_accuracy"][l] for l in labels])),
            "capacity_global": {l: 100 * f["capacity_global_accuracy"][l] for l in labels},
            "full_model": 100 * f["global_accuracy"],
            "params_held": {l: s["costs"][l]["params_held"] for l in labels},
            "kept_fraction": {l: s["kept_fraction"][l] for l in labels},
            "paper": {"local": {l: ref.get("local", {}).get(l) for l in labels},
                      "global": ref.get("global")},
        }
    return out


def direction(nums: dict, labels: Sequence[str], paper_key: str = "") -> list[str]:
    """The paper's claims (FIARSE's global above HeteroFL's and FedRolex's, the gap
    largest at the smallest size), checked on these numbers, one sentence each."""
    cells = PAPER.get(paper_key, {})
    lines = []
    fiarse = [v for v in ("fiarse_tcb", "fiarse_masked") if v in nums]
    for base in ("heterofl", "fedrolex"):
        if base not in nums:
            continue
        for v in fiarse:
            d = nums[v]["global"] - nums[base]["global"]
            paper = (f" (paper: FIARSE above by "
                     f"{cells['fiarse']['global'] - cells[base]['global']:.2f})"
                     if base in cells else "")
            lines.append(f"`{v}` global {'above' if d > 0 else 'below'} `{base}`'s by "
                         f"{abs(d):.2f} points{paper}.")
            gaps = [nums[v]["capacity_global"][l] - nums[base]["capacity_global"][l]
                    for l in labels]
            largest = labels[int(np.argmax(gaps))]
            lines.append(f"  per size on the global test set ({', '.join(labels)}): "
                         + ", ".join(f"{g:+.2f}" for g in gaps)
                         + f"; largest at {largest}"
                         + (" (the smallest size, as the paper says)." if largest == labels[0]
                            else "."))
    return lines


def markdown(nums: dict, labels: Sequence[str], failures: dict[str, str], paper_key: str,
             facts: dict) -> str:
    """reproduction.md (see module docstring)."""
    head = (["variant"] + [f"local {l}" for l in labels] + ["global (mean over sizes)",
                                                           "full model"])
    rows = [f"# Reproduction: {facts['data']} — ours (paper, gap)", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, n in nums.items():
        rows.append("| " + " | ".join(
            [f"`{v}`"] + [_gap(n["local"][l], n["paper"]["local"][l]) for l in labels]
            + [_gap(n["global"], n["paper"]["global"]), f"{n['full_model']:.2f}"]) + " |")
    for v, e in failures.items():
        rows.append("| " + " | ".join([f"`{v}`", f"**failed**: {e}"] + [""] * (len(head) - 2))
                    + " |")
    rows += ["", "Parameters held per size (maskable share in brackets): every method at the "
             "same budget.", "", "| variant | " + " | ".join(labels) + " |",
             "|---|" + "---|" * len(labels)]
    for v, n in nums.items():
        rows.append(f"| `{v}` | " + " | ".join(
            f"{n['params_held'][l]:,} ({100 * n['kept_fraction'][l]:.2f} %)" for l in labels)
            + " |")
    rows += ["", "## Direction of the paper's claims", ""]
    rows += [f"- {l}" if not l.startswith("  ") else f"  - {l.strip()}"
             for l in direction(nums, labels, paper_key)] or ["- (needs fiarse and heterofl/fedrolex)"]
    rows += ["", "## Run", ""] + [f"- {k}: {v}" for k, v in facts.items()]
    rows += ["", "Paper cells: " + (f"`{paper_key}` (FIARSE paper, Table 1/2; FIARSE's "
                                     "cells stand beside both of our FIARSE variants)"
                                     if paper_key else "none (config.paper is empty)")]
    return "\n".join(rows) + "\n"


def plot_vs_paper(nums: dict, labels: Sequence[str], path: str) -> str:
    """Ours (bars) and the paper's cells (black ticks) per size and global."""
    plt = plots._pyplot()
    groups = [f"local {l}" for l in labels] + ["global"]
    fig, ax = plt.subplots(figsize=(3 + 1.3 * len(groups), 3.8))
    width = 0.8 / max(1, len(nums))
    for i, (v, n) in enumerate(nums.items()):
        ours = [n["local"][l] for l in labels] + [n["global"]]
        ref = [n["paper"]["local"][l] for l in labels] + [n["paper"]["global"]]
        xs = np.arange(len(groups)) + i * width - 0.4 + width / 2
        ax.bar(xs, ours, width, label=v)
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
              progress: bool | None = None) -> dict[str, Any]:
    """Train the variants and write the report (see module docstring)."""
    variants = list(variants or VARIANTS)
    configs = variant_configs(config, variants)
    summaries, histories, failures = compare.run_all(configs, workdir, progress=progress)
    labels = [evaluate.capacity_label(c) for c in sorted(config.capacities)]
    paper_key = config.get("paper", "")
    nums = numbers(summaries, labels, paper_key)
    first = next(iter(summaries.values()), {})
    facts = {
        "data": f"{config.data.name} ({config.data.get('data_dir') or 'built in'})",
        "federation": f"{config.data.num_clients} clients, {config.clients_per_round} per "
                      f"round, partition {config.data.get('partition', 'dirichlet')} "
                      f"(α = {config.data.alpha}), sizes {', '.join(labels)}",
        "model": ", ".join(f"{k}={v}" for k, v in config.model.items()),
        "schedule": f"{config.num_rounds} rounds, K = {config.client.local_steps} "
                    f"{config.client.optimizer} steps (lr {config.client.learning_rate}, batch "
                    f"{config.client.batch_size}); evaluation batch "
                    f"{config.get('eval', {}).get('batch_size', 0) or config.client.batch_size}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"backend {first.get('backend', '?')} (strategy {first.get('strategy', '?')})",
        "wall time": ", ".join(f"{v} {s['wall_time_s'] / 60:.1f} min"
                               for v, s in summaries.items()),
    }
    paths.makedirs(workdir)
    text = markdown(nums, labels, failures, paper_key, facts)
    write_atomic(os.path.join(workdir, "reproduction.md"), text)
    pngs = []
    if summaries:
        pngs.append(plot_vs_paper(nums, labels, os.path.join(workdir, "reproduction_vs_paper.png")))
        pngs += plots.plot_comparison(summaries, histories, workdir)
    result = {"variants": variants, "labels": labels, "paper": paper_key, "numbers": nums,
              "failures": failures, "facts": facts, "plots": pngs, "table": text,
              "summaries": summaries}
    write_atomic(os.path.join(workdir, "reproduction.json"),
                 json.dumps(result, indent=2, default=str))
    return result
