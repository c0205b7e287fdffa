"""The end-of-run summary (``summary.json``): final metrics, kept fractions, costs, setup."""
from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from fiarse_jax import policies
from fiarse_jax.core.capacities import capacity_label
from fiarse_jax.core.masks import maskable_flags, path_names
from fiarse_jax.experiment import costs
from fiarse_jax.federated import devices, xla
from fiarse_jax.models import conv as conv_lib
from fiarse_jax.robust import reputation


def kept_fractions(policy, params, round_state, capacities, is_maskable=None, key=None
                   ) -> tuple[list[float], list[dict[str, float]]]:
    """Per level: the fraction of maskable scalars its sub-model keeps, overall and per
    top-level module (layer); ``key``: a random policy's draw (default ``PRNGKey(0)``)."""
    key = jax.random.PRNGKey(0) if key is None else key
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    layers = [path_names(p)[0] for p, _ in flat]
    flags = maskable_flags(params, is_maskable)
    size = maskable_sizes(params, is_maskable)
    total = sum(size.values())
    overall, per_layer = [], []
    for lvl in range(len(capacities)):
        spec = policy.client_spec(round_state, lvl, key)
        m = jax.tree_util.tree_leaves(policy.mask(params, spec))
        kept = {}
        for x, f, layer in zip(m, flags, layers):
            if f:
                kept[layer] = kept.get(layer, 0.0) + float(x.sum())
        overall.append(sum(kept.values()) / total)
        per_layer.append({k: kept[k] / size[k] for k in kept})
    return overall, per_layer


def maskable_sizes(params, is_maskable=None) -> dict[str, int]:
    """Maskable scalars per top-level module (layer): the sizes behind
    ``kept_fraction_per_layer``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    out: dict[str, int] = {}
    for (p, leaf), f in zip(flat, maskable_flags(params, is_maskable)):
        if f:
            layer = path_names(p)[0]
            out[layer] = out.get(layer, 0) + int(leaf.size)
    return out


def summarize(config, run, algorithm, state, history: list, rounds: list, *,
              resumed_from: int | None, t_start: float,
              disconnected_at_start: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The summary of a finished run of ``config`` (``run``: its ``Run``; ``state``: the final
    ``algorithm.ServerState``; ``history``/``rounds``: the evaluation and round rows;
    ``disconnected_at_start``: ``connectivity.disconnected_levels`` of the initial model)."""
    capacities, assignment, o = run.capacities, run.assignment, run.options
    params = devices.local_view(state.params)
    final_state = run.eval_state(params, o.schedule.num_rounds)
    labels = [capacity_label(c) for c in capacities]
    kept_overall, kept_layers = kept_fractions(run.policy, params, final_state, capacities,
                                               run.is_maskable, run.eval_key)
    cost = costs.capacity_costs(run.model, params, run.policy, final_state, capacities,
                                structured=config.method in policies.STRUCTURED,
                                unit_groups=run.unit_groups, x_one=run.x_one,
                                is_maskable=run.is_maskable, key=run.eval_key)
    return {
        "config": config.to_dict(),
        "final": history[-1],
        "capacities": dict(zip(labels, capacities)),
        "kept_fraction": dict(zip(labels, kept_overall)),
        "kept_fraction_per_layer": dict(zip(labels, kept_layers)),
        "maskable_per_layer": maskable_sizes(params, run.is_maskable),
        # levels whose round-0 sub-model held no weight at a cut (``connectivity``)
        "disconnected_at_start": disconnected_at_start or {},
        "costs": cost,
        "num_classes": run.data.num_classes,
        # which global test set the global numbers are on (``eval.global_order``)
        "global_test": {"order": config.get("eval", {}).get("global_order", "clients"),
                        "samples": int(len(run.data.global_test()[1]))},
        "num_params": int(sum(l.size for l in jax.tree_util.tree_leaves(params))),
        "clients_per_level": {capacity_label(c): int((assignment == i).sum())
                              for i, c in enumerate(capacities)},
        "strategy": algorithm.strategy,
        "clients_per_chunk": algorithm.clients_per_chunk,
        "server_inputs": "streamed" if algorithm.streaming else "stacked",
        "rounds_per_program": algorithm.rounds_per_program,
        "backend": jax.default_backend(),
        # what computes differently per backend (``engine.xla``, ``model.conv``), as resolved
        "xla_options": xla.compiler_options(o.engine.xla),
        "conv": conv_lib.resolve(run.model.conv) if hasattr(run.model, "conv") else None,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "resumed_from_round": resumed_from,
        "attackers": int(run.attackers.sum()) if o.attack.kind != "none" else 0,
        "reputation": reputation.summary(state.reputation, o.server.exclude_after_flags,
                                         np.asarray(run.attackers, bool)
                                         & (o.attack.kind != "none")),
        "dp": ({"noise_multiplier": state.sigma, "epsilon": rounds[-1].get("dp_epsilon"),
                "delta": o.dp.delta, "segments": [list(s) for s in state.dp_segments]}
               if state.sigma > 0 else None),
        "wall_time_s": round(time.time() - t_start, 2),
    }


def jsonable(x):
    """``json.dumps``'s ``default`` for the summary: NumPy scalars, tuples, sets, the rest as str."""
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, (tuple, set)):
        return list(x)
    return str(x)
