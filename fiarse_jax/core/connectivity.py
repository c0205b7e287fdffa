"""Does a level's sub-model still connect its input to its output?

With global-scope thresholds a small level keeps only the largest |w| of the whole model,
and at initialisation those can all sit in some layers: the default MLP's 1/16 level keeps
only first-layer weights (θ above every output weight), a small CNN on 32×32 images at
1/64 keeps nothing of its first dense layer. A layer with no skip around it that holds no
weight cuts the input off: the sub-model's output is a constant, and its clients' round-0
updates reach only what lies after the cut. This is the method, not a bug (training
usually reconnects it within rounds; the ResNet's shortcuts keep it connected), so the
run says so at start (``train``) and ``summary.json`` records it.

A model describes its cuts with ``output_cuts() -> {name: [branch, ...]}``: the input
is cut at ``name`` when every branch is broken, a branch being a list of parameter path
prefixes all of which must hold something (a chain layer: one branch, its kernel; a
residual block with a projection: the conv path and the shortcut). A model without the
method (RoBERTa: residual everywhere) is never reported, nor is a method that reads out
at early exits (``scalefl``: its small levels drop the deeper layers on purpose).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from fiarse_jax.core.masks import path_names

Cuts = Mapping[str, Sequence[Sequence[tuple[str, ...]]]]


def chain_cuts(layer_names: Sequence[str]) -> dict[str, list[list[tuple[str, ...]]]]:
    """A plain chain of layers: each layer's kernel is a cut of its own."""
    return {n: [[(n, "kernel")]] for n in layer_names}


def empty_cuts(mask, cuts: Cuts) -> list[str]:
    """The cuts of ``cuts`` at which the 0/1 pytree ``mask`` holds no path (in order)."""
    held = {path_names(p): float(np.asarray(leaf).sum()) > 0
            for p, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]}

    def holds(prefix: tuple[str, ...]) -> bool:
        return any(h for k, h in held.items() if k[:len(prefix)] == tuple(prefix))

    return [name for name, branches in cuts.items()
            if all(not all(holds(m) for m in branch) for branch in branches)]


def disconnected_levels(policy, model, params, round_state, labels: Sequence[str],
                        key=None) -> dict[str, list[str]]:
    """``{label: [cut, ...]}`` for every level whose sub-model of ``params`` (with the
    policy's ``round_state``; ``key``: a random policy's draw) holds nothing at some cut
    of ``model.output_cuts()``; levels that stay connected are left out."""
    cuts = model.output_cuts() if hasattr(model, "output_cuts") else {}
    if not cuts:
        return {}
    key = jax.random.PRNGKey(0) if key is None else key
    out = {}
    for lvl, label in enumerate(labels):
        cut = empty_cuts(policy.mask(params, policy.client_spec(round_state, lvl, key)), cuts)
        if cut:
            out[label] = cut
    return out


def note(disconnected: Mapping[str, Sequence[str]]) -> str | None:
    """One line saying which levels start cut off where (None when none)."""
    if not disconnected:
        return None
    parts = "; ".join(f"{label}: {', '.join(c)}" for label, c in disconnected.items())
    return (f"note: at round 0 these levels' sub-models hold no weight of a layer with no "
            f"skip around it, so their output ignores the input until training reconnects "
            f"it (global-scope thresholds; docs/design.md) — {parts}")
