"""Field checks the datasets' config checks share.

Each raises one ``ValueError`` line ``data.<field> = <value>: <what is allowed>``;
``config.validate_config`` reports it as ``config.data.<field> = ...``.
"""
from __future__ import annotations

from typing import Any


def fail(field: str, value: Any, allowed: str):
    """Raise the one-line error for config.data's ``field``."""
    raise ValueError(f"data.{field} = {value!r}: {allowed}")


def integer(data, field: str, lo: int = 1) -> int:
    """``data[field]``, which must be an integer ≥ ``lo`` (not a bool)."""
    v = data[field]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        fail(field, v, f"must be an integer ≥ {lo}")
    return v


def choice(data, field: str, allowed) -> Any:
    """``data[field]``, which must be one of ``allowed``."""
    v = data[field]
    try:
        ok = v in allowed
    except TypeError:   # an unhashable value asked of a dict
        ok = False
    if not ok:
        fail(field, v, f"must be one of {sorted(allowed)}")
    return v


def data_dir(data) -> None:
    """``data.data_dir``, where present, is a path or None."""
    v = data.get("data_dir")
    if v is not None and not isinstance(v, str):
        fail("data_dir", v, "must be a path or None")
