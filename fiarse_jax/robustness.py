"""Clean vs attacked training under several aggregation rules, and a DP run, from one config.

``robustness(config, workdir)`` trains ``config`` (same seed, partition, capacities and
client schedule throughout; only the server rule, the attack and DP change) for every
scenario in ``SCENARIOS`` into ``workdir/<scenario>-<aggregator>/`` and writes, in
``workdir``: ``robustness.md`` (full-model accuracy on the pooled test set, each
capacity's local accuracy, updates rejected, ε for DP), ``robustness.json`` and
``robustness.png`` (full-model accuracy per scenario, one bar per aggregator).
"""
from __future__ import annotations

import json
import os
from typing import Any

from fiarse_jax import plots, train
from fiarse_jax.config import validate_config
from fiarse_jax.metrics import read_jsonl, write_atomic

AGGREGATORS = ("mean", "median", "trimmed_mean", "norm_bounded")
#: scenario -> (config overrides, aggregators run under it).
SCENARIOS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "clean": ({}, AGGREGATORS),
    "sign_flip_20": ({"attack.kind": "sign_flip", "attack.fraction": 0.2}, AGGREGATORS),
    "scale_20": ({"attack.kind": "scale", "attack.fraction": 0.2, "attack.scale": 10.0},
                 AGGREGATORS),
    # DP: the norm/direction screens would void its sensitivity bound (config refuses them).
    "dp": ({"dp.noise_multiplier": 0.5, "dp.clip_norm": 0.5, "server.validate": False},
           ("mean",)),
}


def scenario_configs(config) -> dict[str, Any]:
    """{run name: config} for every scenario × aggregator, each validated."""
    out = {}
    for scenario, (fields, rules) in SCENARIOS.items():
        for rule in rules:
            cfg = config.copy_and_resolve_references()
            with cfg.unlocked():
                cfg.server.aggregator = rule
                for field, value in fields.items():
                    node = cfg
                    *parents, leaf = field.split(".")
                    for p in parents:
                        node = node[p]
                    node[leaf] = value
            validate_config(cfg)
            out[f"{scenario}-{rule}"] = cfg
    return out


def markdown_table(summaries: dict[str, dict], rejected: dict[str, int]) -> str:
    labels = plots.by_size(next(iter(summaries.values()))["capacities"])
    head = (["scenario", "aggregator", "full model"] + [f"local {l}" for l in labels]
            + ["updates rejected", "ε (δ)"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summaries.items():
        scenario, rule = name.split("-", 1)
        f, dp = s["final"], s.get("dp")
        eps = f"{dp['epsilon']:.2f} ({dp['delta']:g})" if dp else "—"
        rows.append("| " + " | ".join(
            [scenario, f"`{rule}`", f"{100 * f['global_accuracy']:.2f}"]
            + [f"{100 * f['local_accuracy'][l]:.2f}" for l in labels]
            + [str(rejected[name]), eps]) + " |")
    return "\n".join(rows) + "\n"


def robustness(config, workdir: str, *, progress: bool | None = None) -> dict[str, Any]:
    """Run every scenario; write the table, JSON and plot; return them."""
    configs = scenario_configs(config)   # all checked before any run starts
    summaries, rejected = {}, {}
    for name, cfg in configs.items():
        run_dir = os.path.join(workdir, name)
        summaries[name] = train.train_and_evaluate(cfg, run_dir, progress=progress)
        rejected[name] = sum(r.get("rejected", 0)
                             for r in read_jsonl(os.path.join(run_dir, "rounds.jsonl")))
    table = markdown_table(summaries, rejected)
    write_atomic(os.path.join(workdir, "robustness.md"), table)
    scenarios = list(SCENARIOS)
    series = {rule: [100 * summaries[f"{s}-{rule}"]["final"]["global_accuracy"]
                     if f"{s}-{rule}" in summaries else 0.0 for s in scenarios]
              for rule in AGGREGATORS}
    png = plots.grouped_bars(scenarios, series, "full-model accuracy (%)", (0, 100),
                              os.path.join(workdir, "robustness.png"))
    result = {"table": table, "plot": png, "rejected": rejected, "summaries": summaries}
    write_atomic(os.path.join(workdir, "robustness.json"),
                 json.dumps(result, indent=2, default=str))
    return result
