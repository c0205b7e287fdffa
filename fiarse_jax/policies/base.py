"""The mask-policy interface: how a method turns the global model into sub-models.

Every extraction method (FIARSE, HeteroFL, FedRolex, dropout, ...) is a
``MaskPolicy``: four pure functions over pytrees. The engine and the server only
ever call these, so a new method is one file plus its registration.

Shapes: ``prepare`` runs once per round on the server and returns a *round
state* holding what every capacity level needs (stacked on a leading level axis
so that one threshold pass serves all levels). ``client_spec`` picks one client's share of
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

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax

Params = Any
RoundState = Any
ClientSpec = Any


#: Option types whose ``Literal`` values are the choices ``check_method_config`` accepts
#: (they equal ``masks.SCOPES`` and ``fiarse.GRADIENTS``, which the builders also check).
Scope = Literal["global", "layer"]
Gradient = Literal["tcb", "masked"]

#: Builder parameters the caller fills from the model (not config options).
BUILDER_ARGS = ("unit_groups", "is_maskable", "group_fn")


class MaskPolicy(NamedTuple):
    """A sub-model extraction method: pure functions over pytrees (module docstring).

    Attributes:
      name: the method's registry name.
      prepare: ``(global_params, round_index, key) -> round_state``, once per round.
      client_spec: ``(round_state, level_index, key) -> spec`` for one client (vmappable).
      apply: ``(params, spec) -> sub-model params`` used in the client's loss.
      mask: ``(params, spec) -> 0/1 pytree`` of the coordinates the client holds.
      objective: optional ``(outputs [E, B, K], labels, spec) -> loss`` (early exits).
      readout: optional ``(outputs [E, B, K], spec) -> logits [B, K]`` (early exits).
    """

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
    """Default ``client_spec``: index the leading level axis of every leaf.

    Args:
      round_state: a pytree whose leaves are stacked on a leading level axis.
      level: the client's capacity level index (an int or a traced int32).
      key: unused (the ``client_spec`` signature).

    Returns:
      The pytree of every leaf's ``[level]`` slice.
    """
    del key
    return jax.tree_util.tree_map(lambda t: t[level], round_state)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What the method registry knows of a method (``policies.register_method``).

    Attributes:
      builder: ``builder(capacities, *, unit_groups=None, **options) -> MaskPolicy``. Its
        keyword-only parameters other than ``BUILDER_ARGS`` are the method's config options
        (``config.<method>``), their defaults the defaults and ``Literal[...]``
        annotations the choices (``options.check_options``).
      structured: masks drop whole units (the sub-model shrinks to dense arrays).
      per_client_random_masks: every client draws its own mask, not one per level
        (DP-FedAvg refuses such a method).
      description: one line saying what the method keeps (``fiarse-jax list``).
      uses_exits: the method trains a model's early-exit heads (``model.early_exits``);
        for the others the heads are dead weight that would take masks' budget, so
        ``compare``/``reproduce`` build their models without them.
      check_options: optional ``(options) -> None`` for rules on the options beyond types
        and choices (ranges, ...), given every option (defaults filled in); raises
        ``ValueError("<key> = <value!r>: ...")``, ``key`` relative to the method's section.
      check_model: optional ``(options, model_cls, model) -> None`` for rules tying the
        options to the model, run for the method in use: ``model`` is ``config.model``
        (its ``name`` and fields), ``model_cls`` its class (``None`` if unknown); raises
        ``ValueError("<field> = <value!r>: ...")``, ``field`` relative to the config root
        (``"heterofl.scaler"``, ``"model"``).
    """

    builder: Callable[..., MaskPolicy]
    structured: bool = False
    per_client_random_masks: bool = False
    uses_exits: bool = False
    description: str = ""
    check_options: Callable[[Mapping[str, Any]], None] | None = None
    check_model: Callable[[Mapping[str, Any], type | None, Mapping[str, Any]], None] | None = None
