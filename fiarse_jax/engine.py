"""Execution strategies: run one round's client updates, knowing nothing of the method.

* ``"vmap"``: the client axis vmapped, the K local steps in a ``fori_loop`` (a
  scan), all in one jit: the accelerator path.
* ``"loop"``: a Python loop over clients and steps of jitted ``init``/``step``/
  ``final``: the fast path on CPU, where convolution gradients inside ``scan`` are
  many times slower (jax-ml/jax#12868).
* ``"auto"``: ``vmap`` on GPU/TPU, ``loop`` on CPU.

Both run the same ``ClientFns``, so with the same keys one round agrees up to
float rounding (tested). Over many rounds the tiny differences can flip a
threshold decision |w| ≥ θ, so long trajectories drift apart like any two
float orderings would; final accuracies agree to within noise, not bit for bit. Inputs carry a leading client axis: ``specs`` (from the policy),
``data`` (``ClientData``) and ``keys``; the output is a ``ClientResult`` stacked
on that axis.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fiarse_jax.client import ClientFns, ClientResult, client_update
from fiarse_jax.data.federated import ClientData

STRATEGIES = ("auto", "loop", "vmap")
RoundRunner = Callable[[Any, Any, ClientData, jax.Array], ClientResult]


def resolve_strategy(strategy: str) -> str:
    """``auto`` → ``vmap`` on accelerators, ``loop`` on CPU; others unchanged."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown engine strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy == "auto":
        return "loop" if jax.default_backend() == "cpu" else "vmap"
    return strategy


def _index(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def _loop_runner(fns: ClientFns) -> RoundRunner:
    init, step, final = jax.jit(fns.init), jax.jit(fns.step), jax.jit(fns.final)
    step_ids = [jnp.asarray(k, jnp.int32) for k in range(fns.num_steps)]

    def run(params, specs, data, keys):
        results = []
        for i in range(keys.shape[0]):
            spec_i, data_i = _index(specs, i), _index(data, i)
            state = init(params, spec_i, data_i, keys[i])
            for k in step_ids:
                state = step(state, spec_i, data_i, k)
            results.append(final(params, state, spec_i))
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *results)

    return run


def _vmap_runner(fns: ClientFns) -> RoundRunner:
    one_client = functools.partial(client_update, fns)
    return jax.jit(jax.vmap(one_client, in_axes=(None, 0, 0, 0)))


def make_round_runner(fns: ClientFns, strategy: str = "auto") -> RoundRunner:
    """A function ``(params, specs, data, keys) -> ClientResult`` (stacked per client)."""
    strategy = resolve_strategy(strategy)
    return _loop_runner(fns) if strategy == "loop" else _vmap_runner(fns)
