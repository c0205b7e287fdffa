"""Mask policies by name. Add a method: one module here plus one registry line."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from fiarse_jax.policies.base import MaskPolicy, select_level
from fiarse_jax.policies.fiarse import fiarse_policy

#: name -> builder(capacities, **options) -> MaskPolicy
POLICIES: dict[str, Callable[..., MaskPolicy]] = {
    "fiarse": fiarse_policy,
}


def build_policy(name: str, capacities: Sequence[float],
                 options: Mapping[str, Any] | None = None) -> MaskPolicy:
    """The policy ``name`` for these capacity levels, with its config options."""
    if name not in POLICIES:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(POLICIES)}")
    return POLICIES[name](capacities, **dict(options or {}))


__all__ = ["MaskPolicy", "POLICIES", "build_policy", "fiarse_policy", "select_level"]
