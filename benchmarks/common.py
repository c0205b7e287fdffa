"""What every benchmark records about where it ran, and how it reports."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

import jax


def environment() -> dict[str, Any]:
    """Backend, devices, CPU count, OS and jax version: the context a timing needs."""
    return {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "cpu_count": os.cpu_count(), "machine": platform.platform(), "jax": jax.__version__}


CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")


def load_config_file(file: str, arg: str | None = None):
    """``configs/<file>``'s ``get_config(arg)`` (``get_config()`` without ``arg``)."""
    spec = importlib.util.spec_from_file_location(file[:-3], os.path.join(CONFIGS, file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def set_fields(config, fields: dict[str, Any]) -> None:
    """Set ``config``'s fields by dotted name (``{"engine.strategy": "vmap"}``); a leaf
    the config lacks is added."""
    for field, value in fields.items():
        node = config
        *parents, leaf = field.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value


def timed_rounds(algorithm, state, ids: list) -> tuple[Any, list, float]:
    """``algorithm.apply_rounds(state, ids)`` timed to the params being ready on the host
    side: ``(state, the rounds' stats, seconds)``."""
    t0 = time.perf_counter()
    state, stats = algorithm.apply_rounds(state, ids)
    jax.block_until_ready(state.params)
    return state, stats, time.perf_counter() - t0


def report(result: dict, columns: Sequence[tuple[str, str, str]], out: str) -> None:
    """Print ``result["rows"]`` as a table (``(key, header, format)`` per column) and
    write ``result`` as JSON to ``out``."""
    print("".join(f"{h:>{max(len(h) + 2, 10)}}" if i else f"{h:<16}"
                  for i, (_, h, _) in enumerate(columns)))
    for r in result["rows"]:
        print("".join((f"{r[k]:>{max(len(h) + 2, 10)}{f}}" if r.get(k) is not None
                       else f"{'-':>{max(len(h) + 2, 10)}}") if i else f"{r[k]:<16}"
                      for i, (k, h, f) in enumerate(columns)))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
