"""XLA options every program of the engine and the evaluation compiles with.

``compiler_options(setting)`` gives the per-backend options (``EngineOptions.xla``:
``auto`` or ``default``); ``jit`` compiles with them, and falls back to a plain nested
``jax.jit`` inside another trace (XLA options belong to the outermost program).
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp

#: ``config.engine.xla``: "auto" compiles with ``compiler_options``' per-backend choices,
#: "default" with XLA's defaults.
XLA_SETTINGS = ("auto", "default")


#: XLA:CPU's default YNNPACK library fusions less convolutions (checked against the
#: default in the tests: if a jaxlib changes its default, they say so).
_CPU_YNN_NO_CONV = ",".join("LIBRARY_FUSION_TYPE_" + t for t in
                            ("DOT", "REDUCE", "INDIVIDUAL_DOT"))


def _ynn_probe(x, w, a, b):
    """A convolution, and a dense layer's step: what the YNNPACK option list must leave as
    XLA:CPU's default compiles it (``_cpu_choice_holds``)."""
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    def loss(m):
        return jnp.sum(jnp.tanh(a @ m) ** 2)
    return y, b - 0.1 * jax.grad(loss)(b), jnp.exp(b).max(1)


@functools.cache
def _cpu_choice_holds() -> bool:
    """Whether this jaxlib knows the option and ``_CPU_YNN_NO_CONV`` plus convolutions is
    exactly its default (the probe compiles identically): only then does leaving
    convolutions out change nothing else. Another jaxlib: XLA's defaults."""
    args = [jnp.ones(s, jnp.float32) for s in ((2, 16, 16, 32), (3, 3, 32, 32), (20, 64),
                                               (64, 128))]

    def text(options):
        compiled = jax.jit(_ynn_probe, compiler_options=options).lower(*args).compile()
        return re.sub(r"metadata=\{.*?\}", "", compiled.as_text())

    key = "xla_cpu_experimental_ynn_fusion_type"
    try:
        return text(None) == text({key: _CPU_YNN_NO_CONV
                                   + ",LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"})
    except Exception:   # noqa: BLE001 — an unknown option or value is an XLA runtime error
        return False


def compiler_options(setting: str = "auto", backend: str | None = None) -> dict[str, str]:
    """XLA options the engine's programs (and evaluation) compile with on ``backend``.

    ``"auto"`` on CPU: XLA's YNNPACK fusions stay as by default, but convolutions go to
    XLA's Eigen convolution instead of YNNPACK's (with ``models.conv``'s canonical backward
    convolutions a CIFAR ResNet-18 round took 31.8 s instead of 36.9 s on 2 cores in one
    run of ``benchmarks/suite.py --sections resnet``, 32.9 s instead of 33.2 s in another:
    the gain is within this machine's run-to-run spread; docs/profile.md shows the time
    leaving YNNPACK's convolutions). Only where this jaxlib's default is the
    one checked (``_cpu_choice_holds``); otherwise none. Other backends: none yet (XLA's
    defaults) — GPU choices wait for a measurement. ``"default"``: none anywhere.

    Args:
      setting: one of ``XLA_SETTINGS``.
      backend: default JAX's ``default_backend()``.

    Returns:
      ``{option: value}`` for ``jax.jit(..., compiler_options=...)`` (may be empty).
    """
    if setting not in XLA_SETTINGS:
        raise ValueError(f"engine.xla = {setting!r}: expected one of {XLA_SETTINGS}")
    backend = jax.default_backend() if backend is None else backend
    options = {}
    if setting == "auto" and backend == "cpu":
        options = {"xla_cpu_experimental_ynn_fusion_type": _CPU_YNN_NO_CONV}
    if not options or backend != jax.default_backend():
        return options
    return options if _cpu_choice_holds() else {}


def jit(fun, options: dict[str, str] | None = None, **kwargs):
    """``jax.jit(fun, **kwargs)`` compiled with ``options`` (``compiler_options()`` if None).

    Called inside another trace (an outer ``jit``, e.g. a whole round compiled at once)
    it is a plain nested ``jax.jit``: XLA options belong to the outermost program.
    """
    options = compiler_options() if options is None else options
    plain = jax.jit(fun, **kwargs)
    if not options:
        return plain
    tuned = jax.jit(fun, compiler_options=options, **kwargs)

    @functools.wraps(fun)
    def call(*args, **kw):
        try:
            return tuned(*args, **kw)
        except ValueError as e:   # inside another trace: jax refuses the options there
            if "compiler_options" not in str(e):
                raise
            return plain(*args, **kw)

    call.lower = tuned.lower
    return call
