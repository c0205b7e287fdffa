"""Mask policies by name. Add a method: one module here plus one ``register_method`` line.

A builder is ``builder(capacities, *, unit_groups=None, **options) -> MaskPolicy``;
``unit_groups`` is the model's unit description (``units.UnitGroup``), needed by the
structured methods; ``options`` come from ``config.<method>``.

Capacities are fractions of *parameters* for every method: a level r holds ≈ ⌈r·N⌉ of
the N maskable parameters. The structured builders (``heterofl``, ``fedrolex``,
``fed_dropout``, ``fiarse_neuron``, ``fedavg_smallest``) take ``budget="params"`` (that
rule: one common width ≈ √r on deep models, see ``policies.structured``) or
``budget="width"`` (⌈r·C⌉ units of every layer, the baselines' width ratios, ≈ r² of the
parameters on deep models); ``scalefl`` fills the same parameter budget.

``scalefl``: a simplified ScaleFL/DepthFL-style baseline (width and depth shrink
together, early exits, self-distillation); needs ``MLP(early_exits=True)`` or
``ResNet18(early_exits=True)``, see ``docs/scalefl.md``.

The registry (``METHODS``: name -> ``MethodSpec``) owns each method's config options: a
builder's keyword-only parameters (less ``BUILDER_ARGS``) are ``config.<method>``'s
fields, with their defaults and ``Literal`` choices; ``check_method_config`` checks a
section against them and runs the spec's own rules. ``POLICIES`` (name -> builder) and
``STRUCTURED`` are live read-only views of it.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from typing import Any

from fiarse_jax.policies import heterofl, scalefl
from fiarse_jax.policies.base import BUILDER_ARGS, MaskPolicy, MethodSpec, select_level
from fiarse_jax.policies.fed_dropout import fed_dropout_policy
from fiarse_jax.policies.fedavg import fedavg_full_policy, fedavg_smallest_policy
from fiarse_jax.policies.fedrolex import fedrolex_policy
from fiarse_jax.policies.fiarse import fiarse_policy
from fiarse_jax.policies.fiarse_neuron import fiarse_neuron_policy
from fiarse_jax.policies.heterofl import heterofl_policy
from fiarse_jax.policies.scalefl import scalefl_policy
from fiarse_jax.utils import options as options_lib

#: name -> MethodSpec: the registry (``register_method``).
METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, spec: MethodSpec | Callable[..., MaskPolicy], *,
                    replace: bool = False) -> MethodSpec:
    """Add a method to the registry (``config.method = name``, ``config.<name>`` options).

    Args:
      name: the method's name (a Python identifier: it names a config section).
      spec: its ``MethodSpec``, or a bare builder (``MethodSpec(builder)``: unstructured,
        no extra rules).
      replace: allow replacing a registered method.

    Returns:
      The registered spec.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"method name {name!r}: must be a Python identifier")
    if not isinstance(spec, MethodSpec):
        spec = MethodSpec(spec)
    if not callable(spec.builder):
        raise ValueError(f"method {name!r}: builder {spec.builder!r} is not callable")
    if name in METHODS and not replace:
        raise ValueError(f"method {name!r} is already registered (pass replace=True)")
    METHODS[name] = spec
    return spec


def unregister_method(name: str) -> MethodSpec:
    """Remove ``name`` from the registry; returns its spec (``KeyError`` if absent)."""
    return METHODS.pop(name)


register_method("fiarse", MethodSpec(
    fiarse_policy, description="FIARSE: the ⌈r·N⌉ largest |w| (θ_r fixed per round, the mask "
    "re-evaluated every step)"))
register_method("fiarse_neuron", MethodSpec(
    fiarse_neuron_policy, structured=True,
    description="FIARSE over whole units: the most important neurons/channels"))
register_method("heterofl", MethodSpec(
    heterofl_policy, structured=True, check_model=heterofl.check_model,
    description="HeteroFL: the leading channels of every hidden layer"))
register_method("fedrolex", MethodSpec(
    fedrolex_policy, structured=True,
    description="FedRolex: a window of channels that rolls every round"))
register_method("fed_dropout", MethodSpec(
    fed_dropout_policy, structured=True, per_client_random_masks=True,
    description="Federated Dropout: a fresh random subset of units per client and round"))
register_method("fedavg_full", MethodSpec(
    fedavg_full_policy, structured=True,
    description="FedAvg, every client the full model (ignores capacity: an upper bound)"))
register_method("fedavg_smallest", MethodSpec(
    fedavg_smallest_policy, structured=True,
    description="FedAvg, every client the smallest sub-model (a lower bound)"))
register_method("scalefl", MethodSpec(
    scalefl_policy, structured=True, uses_exits=True,
    check_options=scalefl.check_option_ranges, check_model=scalefl.check_model,
    description="ScaleFL-style: width and depth shrink together, early exits, "
    "self-distillation"))


class _Builders(Mapping):
    """name -> builder, a live read-only view of ``METHODS``."""

    def __getitem__(self, name: str) -> Callable[..., MaskPolicy]:
        return METHODS[name].builder

    def __iter__(self) -> Iterator[str]:
        return iter(METHODS)

    def __len__(self) -> int:
        return len(METHODS)

    def __repr__(self) -> str:
        return f"POLICIES({sorted(METHODS)})"


class _Structured(Set):
    """Names of the structured methods, a live read-only view of ``METHODS``."""

    def __contains__(self, name: object) -> bool:
        spec = METHODS.get(name) if isinstance(name, str) else None
        return spec is not None and spec.structured

    def __iter__(self) -> Iterator[str]:
        return (n for n, s in METHODS.items() if s.structured)

    def __len__(self) -> int:
        return sum(s.structured for s in METHODS.values())

    def __repr__(self) -> str:
        return f"STRUCTURED({sorted(self)})"


#: name -> builder(capacities, *, unit_groups=None, **options) -> MaskPolicy
POLICIES: Mapping[str, Callable[..., MaskPolicy]] = _Builders()

#: Methods whose masks drop whole units (the sub-model can be shrunk to dense arrays).
STRUCTURED: Set[str] = _Structured()


def method_options(name: str) -> dict[str, Any]:
    """``{option: default}`` of method ``name`` (its ``config.<name>`` fields)."""
    return options_lib.defaults(_spec(name).builder, skip=BUILDER_ARGS)


def _spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"method = {name!r}: must be one of {sorted(METHODS)}")
    return METHODS[name]


def uses_exits(name: str) -> bool:
    """Whether method ``name`` trains a model's early-exit heads (``MethodSpec.uses_exits``)."""
    return _spec(name).uses_exits


def check_method_config(name: str, section: Mapping[str, Any] | None = None,
                        model: Mapping[str, Any] | None = None,
                        model_cls: type | None = None) -> dict[str, Any]:
    """Validate one method's config section, before anything is built.

    The options are checked against the builder's signature (``options.check_options``:
    unknown keys, types, ``Literal`` choices), then by the spec's ``check_options``, then,
    when ``model`` is given (the method in use), by its ``check_model``.

    Args:
      name: the method (a key of ``METHODS``).
      section: ``config.<name>`` (a dict or ``ConfigDict``; ``None``: all defaults).
      model: ``config.model`` (``name`` and fields) to check the model rules against;
        ``None`` skips them (a section of a method this run does not use).
      model_cls: the class of ``model`` (``models.MODELS.get(model.name)``).

    Returns:
      Every option's value (defaults filled in).

    Raises:
      ValueError: one line ``"<field> = <value!r>: ..."``, ``field`` relative to the
        config root (``"fiarse.scope"``, ``"heterofl.scaler"``, ``"model"``,
        ``"method"``); ``validate_config`` prefixes ``"config."``.
    """
    spec = _spec(name)
    opts = options_lib.check_options(name, spec.builder, section, skip=BUILDER_ARGS)
    if spec.check_options is not None:
        try:
            spec.check_options(opts)
        except ValueError as e:
            raise ValueError(f"{name}.{e}") from None
    if model is not None and spec.check_model is not None:
        spec.check_model(opts, model_cls, model)
    return opts


def build_policy(name: str, capacities: Sequence[float],
                 options: Mapping[str, Any] | None = None, *, unit_groups=None,
                 is_maskable=None, group_fn=None) -> MaskPolicy:
    """The policy ``name`` for these capacity levels, with its config options.

    Args:
      name: a registered method (``METHODS``).
      capacities: the capacity ratios; level i is ``capacities[i]``.
      options: ``config.<name>``, passed to the builder as keyword arguments (an unknown
        one is the builder's ``TypeError``; ``check_method_config`` reports it first).
      unit_groups: the model's unit description (``units.UnitGroup``), needed by the
        structured methods.
      is_maskable: a model's own maskability rule ``(path, leaf) -> bool``; passed to
        builders whose signature names it.
      group_fn: a model's layer-scope θ groups ``(path) -> group`` (e.g. RoBERTa's);
        passed likewise.

    Returns:
      The ``MaskPolicy``.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    builder = METHODS[name].builder
    accepted = inspect.signature(builder).parameters
    extra = {k: v for k, v in (("is_maskable", is_maskable), ("group_fn", group_fn))
             if v is not None and k in accepted}
    return builder(capacities, unit_groups=unit_groups, **extra, **dict(options or {}))


__all__ = ["BUILDER_ARGS", "METHODS", "MaskPolicy", "MethodSpec", "POLICIES", "STRUCTURED",
           "build_policy", "check_method_config", "method_options", "register_method",
           "select_level", "unregister_method", "uses_exits"]
