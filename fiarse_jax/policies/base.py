"""The mask-policy interface: how a method turns the global model into sub-models.

Every extraction method (FIARSE, HeteroFL, FedRolex, dropout, ...) is a
``MaskPolicy``: four pure functions over pytrees. The engine and the server only
ever call these, so a new method is one file plus its registration.

Shapes: ``prepare`` runs once per round on the server and returns a *round
state* holding what every capacity level needs (stacked on a leading level axis
so that one sort serves all levels). ``client_spec`` picks one client's share of
it (a pytree of arrays, identical in structure across clients, so it can be
vmapped). ``apply`` is the differentiable sub-model used in the client's loss;
``mask`` says which coordinates the client holds (the server averages each
coordinate over its holders).

Two optional hooks serve methods whose sub-models read out through different
heads (early exits, ScaleFL/DepthFL-style): with ``readout`` set, the model is
called with ``exits=True`` and returns every exit's logits stacked ``[E, B, K]``;
``objective(outputs, y, spec)`` is the client's training loss on them and
``readout(outputs, spec)`` the logits a sub-model predicts with. Without them
the model returns logits and the loss is the mean cross-entropy.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

Params = Any
RoundState = Any
ClientSpec = Any


class MaskPolicy(NamedTuple):
    """A sub-model extraction method (see module docstring)."""

    name: str
    #: (global_params, round_index, key) -> round state (server side, once per round).
    prepare: Callable[[Params, Any, jax.Array], RoundState]
    #: (round_state, level_index, key) -> one client's spec (vmappable).
    client_spec: Callable[[RoundState, Any, jax.Array], ClientSpec]
    #: (params, spec) -> the sub-model the client computes with (differentiable).
    apply: Callable[[Params, ClientSpec], Params]
    #: (params, spec) -> 0/1 pytree of the coordinates the client holds.
    mask: Callable[[Params, ClientSpec], Params]
    #: optional (outputs [E, B, K], labels, spec) -> scalar training loss.
    objective: Callable[[Any, Any, ClientSpec], Any] | None = None
    #: optional (outputs [E, B, K], spec) -> logits [B, K] the sub-model predicts with.
    readout: Callable[[Any, ClientSpec], Any] | None = None


def select_level(round_state: RoundState, level: Any, key: jax.Array = None) -> ClientSpec:
    """Default ``client_spec``: index the leading level axis of every leaf."""
    del key
    return jax.tree_util.tree_map(lambda t: t[level], round_state)
