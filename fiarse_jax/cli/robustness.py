"""Clean vs attacked training under several aggregation rules, and a DP run, from one config.

``robustness(config, workdir)`` trains ``config`` (same seed, partition, capacities and
client schedule throughout; only the defence, the attack and DP change) for every
scenario in ``SCENARIOS`` under each of its defences (``DEFENCES``: a server rule, or
the core screen with and without reputation) into ``workdir/<scenario>-<defence>/`` and
writes, in ``workdir``: ``robustness.md`` (full-model accuracy on the pooled test set,
each capacity's local accuracy on its honest clients' tests, updates rejected, the share
of honest updates rejected, attackers excluded, ε for DP), ``robustness.json`` and
``robustness.png`` (full-model accuracy per scenario, one bar per defence).
"""
from __future__ import annotations

import json
import os
from typing import Any

from fiarse_jax.cli import plots
from fiarse_jax.core.capacities import by_size
from fiarse_jax.experiment import train
from fiarse_jax.experiment.config import validate_config
from fiarse_jax.experiment.metrics import read_jsonl, write_atomic

#: defence -> config overrides: the server's rule, its screen and reputation.
DEFENCES: dict[str, dict[str, Any]] = {
    "mean": {"server.aggregator": "mean"},
    "median": {"server.aggregator": "median"},
    "trimmed_mean": {"server.aggregator": "trimmed_mean"},
    "norm_bounded": {"server.aggregator": "norm_bounded"},
    # Screens on the coordinates every client of the round holds (validation): norm outliers
    # and updates against the consensus rejected, then the mean.
    "core": {"server.validate": True, "server.screen": "core"},
    # Norm outliers (z > 7) rejected; updates against the consensus only flagged; clients
    # flagged in 3 rounds, and in most of the rounds they were screened in, excluded from
    # then on (reputation); then the mean.
    "core+reputation": {"server.validate": True, "server.screen": "core",
                        "server.z_threshold": 7.0, "server.direction_action": "flag",
                        "server.exclude_after_flags": 3},
}
#: What every defence starts from (the user's config may have screens of its own on).
UNDEFENDED = {"server.validate": False, "server.screen": "held", "server.z_threshold": 3.5,
              "server.cosine_threshold": 0.0, "server.direction_action": "reject",
              "server.exclude_after_flags": 0, "attack.kind": "none", "attack.fraction": 0.0,
              "attack.levels": ()}
RULES = ("mean", "median", "trimmed_mean", "norm_bounded")
NEW = ("core", "core+reputation")
ALL = RULES + NEW


def _attack(kind: str, **more) -> dict[str, Any]:
    return {"attack.kind": kind, "attack.fraction": 0.2, **more}


#: scenario -> (config overrides, defences run under it).
SCENARIOS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    # The clean twin: the same clients marked (attack.fraction), none attacking, so its
    # honest clients' local accuracy is over the same clients as the attacked rows'.
    "clean": ({"attack.fraction": 0.2}, ALL),
    "sign_flip_20": (_attack("sign_flip"), ALL),
    "scale_20": (_attack("scale", **{"attack.scale": 10.0}), ALL),
    "gaussian_20": (_attack("gaussian"), ("mean", "median") + NEW),
    # Coordinated and adaptive: the flipped honest consensus at an honest norm (attacks).
    "adaptive_20": (_attack("adaptive"), ("mean", "median") + NEW),
    "alie_20": (_attack("alie"), ("mean", "median") + NEW),
    # Every attacker at capacity 1: the coordinates only capacity-1 clients hold.
    "sign_flip_20_cap1": (_attack("sign_flip", **{"attack.levels": (0,)}),
                          ("mean", "median") + NEW),
    # DP: the norm/direction screens would void its sensitivity bound (config refuses them).
    "dp": ({"dp.noise_multiplier": 0.5, "dp.clip_norm": 0.5, "attack.fraction": 0.2},
           ("mean",)),
}


def scenario_configs(config) -> dict[str, Any]:
    """{run name: config} for every scenario × defence, each validated."""
    out = {}
    for scenario, (fields, defences) in SCENARIOS.items():
        for defence in defences:
            cfg = config.copy_and_resolve_references()
            with cfg.unlocked():
                for field, value in {**UNDEFENDED, **DEFENCES[defence], **fields}.items():
                    node = cfg
                    *parents, leaf = field.split(".")
                    for p in parents:
                        node = node[p]
                    node[leaf] = value
            validate_config(cfg)
            out[f"{scenario}-{defence}"] = cfg
    return out


def rejections(rows: list[dict], clients_per_round: int) -> dict[str, Any]:
    """Updates rejected over a run's ``rounds.jsonl`` rows, those of honest clients
    (``rejected_honest``; without an attack every client is honest) and their share of
    all honest updates sent."""
    rejected = sum(r["rejected"] for r in rows)
    honest = sum(r.get("rejected_honest", r["rejected"]) for r in rows)
    sent = sum(clients_per_round - r.get("attackers", 0) for r in rows)
    return {"rejected": rejected, "honest_rejected": honest,
            "honest_rejected_share": honest / sent if sent else 0.0}


def markdown_table(summaries: dict[str, dict], rejected: dict[str, dict]) -> str:
    """The committed table: one row per run (scenario, defence), accuracies in %."""
    labels = by_size(next(iter(summaries.values()))["capacities"])
    head = (["scenario", "defence", "full model"] + [f"local {l} (honest)" for l in labels]
            + ["updates rejected", "honest rejected", "attackers excluded", "ε (δ)"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summaries.items():
        scenario, defence = name.split("-", 1)
        f, dp, rep = s["final"], s.get("dp"), s.get("reputation") or {}
        local = f.get("local_accuracy_honest", f["local_accuracy"])
        eps = f"{dp['epsilon']:.2f} ({dp['delta']:g})" if dp else "—"
        excluded = (f"{rep['excluded_attackers']} (+{rep['excluded_honest']} honest)"
                    if rep.get("min_flags") else "—")
        r = rejected[name]
        rows.append("| " + " | ".join(
            [scenario, f"`{defence}`", f"{100 * f['global_accuracy']:.2f}"]
            + [f"{100 * local[l]:.2f}" for l in labels]
            + [str(r["rejected"]), f"{100 * r['honest_rejected_share']:.1f} %", excluded, eps])
            + " |")
    return "\n".join(rows) + "\n"


def robustness(config, workdir: str, *, progress: bool | None = None) -> dict[str, Any]:
    """Run every scenario; write the table, JSON and plot; return them."""
    configs = scenario_configs(config)   # all checked before any run starts
    summaries, rejected = {}, {}
    for name, cfg in configs.items():
        run_dir = os.path.join(workdir, name)
        summaries[name] = train.train_and_evaluate(cfg, run_dir, progress=progress)
        rejected[name] = rejections(read_jsonl(os.path.join(run_dir, "rounds.jsonl")),
                                    cfg.clients_per_round)
    table = markdown_table(summaries, rejected)
    write_atomic(os.path.join(workdir, "robustness.md"), table)
    scenarios = list(SCENARIOS)
    defences = [d for d in DEFENCES if any(f"{s}-{d}" in summaries for s in scenarios)]
    series = {d: [100 * summaries[f"{s}-{d}"]["final"]["global_accuracy"]
                  if f"{s}-{d}" in summaries else float("nan") for s in scenarios] for d in defences}
    png = plots.grouped_bars(scenarios, series, "full-model accuracy (%)", (0, 100),
                              os.path.join(workdir, "robustness.png"))
    result = {"table": table, "plot": png, "rejected": rejected, "summaries": summaries}
    write_atomic(os.path.join(workdir, "robustness.json"),
                 json.dumps(result, indent=2, default=str))
    return result
