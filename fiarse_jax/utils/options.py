"""Options read off a builder's signature: names, defaults, types and choices in one place.

A builder's *options* are its keyword-only parameters (positional ones are the call's
data: capacities, deltas, ...), less the ones named in ``skip`` (arguments the caller
supplies, e.g. a model's ``unit_groups``). Each option's default sets its default value;
its annotation, when it resolves, sets what a value may be:

* ``typing.Literal[...]``: one of the listed values (``must be one of [...]``);
* a class or a union of classes (``float``, ``int``, ``bool``, ``str``, ``X | None``):
  a value of one of them; ``int`` is accepted for ``float``, a bool is never an int or a
  float, a list is accepted for ``tuple``;
* anything else (``Sequence[int]``, no annotation): the default's type, as above
  (no check when the default is ``None`` or there is none).

``check_options`` raises ``ValueError`` naming the bad field and value in one line,
``"<owner>.<key> = <value!r>: <what it must be>"``, the style ``config.validate_config``
prefixes with ``config.``.
"""
from __future__ import annotations

import dataclasses
import inspect
import numbers
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

#: The default of an option without one (a required option).
REQUIRED = inspect.Parameter.empty

_NAMES = {bool: "True or False", int: "an integer", float: "a number", str: "a string",
          tuple: "a sequence", list: "a sequence", type(None): "None"}


@dataclasses.dataclass(frozen=True)
class Option:
    """One keyword-only parameter of a builder, as an option."""

    name: str
    default: Any            #: ``REQUIRED`` when the parameter has no default
    annotation: Any         #: resolved annotation, or ``None`` (absent or unresolvable)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def choices(self) -> tuple | None:
        """The values of a ``Literal[...]`` annotation, else ``None``."""
        if typing.get_origin(self.annotation) is typing.Literal:
            return typing.get_args(self.annotation)
        return None

    @property
    def types(self) -> tuple[type, ...] | None:
        """The classes a value may be (``None``: no type check)."""
        if self.choices is not None:
            return None
        ann = self.annotation
        if isinstance(ann, type):
            return (ann,)
        if typing.get_origin(ann) in (typing.Union, types.UnionType):
            args = typing.get_args(ann)
            if all(isinstance(a, type) for a in args):
                return args
        if self.default is REQUIRED or self.default is None:
            return None
        return (type(self.default),)


def _annotations(fn: Callable) -> dict[str, Any]:
    """``fn``'s resolved parameter annotations; one that does not resolve is left out."""
    try:
        return typing.get_type_hints(fn)
    except Exception:   # one bad annotation: resolve the others one by one
        out = {}
        for name, ann in getattr(fn, "__annotations__", {}).items():
            try:
                out[name] = (eval(ann, getattr(fn, "__globals__", {}))
                             if isinstance(ann, str) else ann)
            except Exception:
                pass
        return out


def options_of(fn: Callable, skip: Iterable[str] = ()) -> dict[str, Option]:
    """``{name: Option}`` of ``fn``'s keyword-only parameters not in ``skip``, in order."""
    skip = set(skip)
    hints = _annotations(fn)
    return {p.name: Option(p.name, p.default, hints.get(p.name))
            for p in inspect.signature(fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name not in skip}


def defaults(fn: Callable, skip: Iterable[str] = ()) -> dict[str, Any]:
    """``{name: default}`` of ``fn``'s options (required ones left out).

    Args:
      fn: the builder; its keyword-only parameters are the options.
      skip: parameter names that are not options.

    Returns:
      The defaults, in signature order.
    """
    return {k: o.default for k, o in options_of(fn, skip).items() if not o.required}


def _is(value: Any, cls: type) -> bool:
    if cls is type(None):
        return value is None
    if cls is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):       # a bool is not a number option
        return False
    if cls is int:
        return isinstance(value, numbers.Integral)
    if cls is float:
        return isinstance(value, numbers.Real)
    if cls in (tuple, list):
        return isinstance(value, (tuple, list))
    return isinstance(value, cls)


def check_value(field: str, option: Option, value: Any) -> None:
    """Raise ``ValueError`` (``"<field> = <value!r>: ..."``) unless ``value`` suits ``option``."""
    choices = option.choices
    if choices is not None:
        if not any(type(value) is type(c) and value == c for c in choices):
            try:
                listed = sorted(choices)
            except TypeError:
                listed = list(choices)
            raise ValueError(f"{field} = {value!r}: must be one of {listed}")
        return
    kinds = option.types
    if kinds is not None and not any(_is(value, k) for k in kinds):
        names = list(dict.fromkeys(_NAMES.get(k, f"a {k.__name__}") for k in kinds))
        raise ValueError(f"{field} = {value!r}: must be {' or '.join(names)}")


def check_options(owner: str, fn: Callable, options: Mapping[str, Any] | None,
                  skip: Iterable[str] = ()) -> dict[str, Any]:
    """Check ``options`` against the options of ``fn`` (see the module docstring).

    Args:
      owner: the name fields are reported under (``"<owner>.<key>"``), e.g. a method's
        config section.
      fn: the builder; its keyword-only parameters not in ``skip`` are the options. With a
        ``**kwargs`` parameter, unknown keys are accepted unchecked.
      options: the given options (a dict, a ``ConfigDict`` or ``None``).
      skip: parameter names that are not options.

    Returns:
      Every option's value: the defaults updated with ``options``.

    Raises:
      ValueError: the first unknown key, missing required option or bad value, in one
        line: ``"<owner>.<key> = <value!r>: is not an option of <owner>; options: [...]"``,
        ``"<owner>.<key> is missing (a required option of <owner>)"``,
        ``"<owner>.<key> = <value!r>: must be one of [...]"`` or ``"...: must be a number"``.
    """
    given = {k: options[k] for k in options.keys()} if options is not None else {}
    known = options_of(fn, skip)
    open_ended = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    unknown = [] if open_ended else sorted(set(given) - set(known))
    if unknown:
        key = unknown[0]
        raise ValueError(f"{owner}.{key} = {given[key]!r}: is not an option of {owner}; "
                         f"options: {sorted(known)}")
    out = {}
    for name, option in known.items():
        if name not in given:
            if option.required:
                raise ValueError(f"{owner}.{name} is missing (a required option of {owner})")
            out[name] = option.default
            continue
        check_value(f"{owner}.{name}", option, given[name])
        out[name] = given[name]
    out.update({k: v for k, v in given.items() if k not in known})
    return out


__all__ = ["REQUIRED", "Option", "check_options", "check_value", "defaults", "options_of"]
