"""xla.compiler_options: per-backend XLA options, and the programs compiled with them."""
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiarse_jax.experiment.config import ConfigError, validate_config
from fiarse_jax.federated import xla

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
DN = ("NHWC", "HWIO", "NHWC")


def _hlo(fun, *args, options=None) -> str:
    compiled = jax.jit(fun, compiler_options=options).lower(*args).compile()
    return re.sub(r"metadata=\{.*?\}", "", compiled.as_text())


def _probe(x, w, a, b):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
    return y, jnp.tanh(a @ b).sum(0), jnp.exp(b).max(1)


def _mlp_step(params, x, y):
    """One SGD step of a dense network (what the digits default compiles)."""
    def loss(p):
        h = jnp.tanh(x @ p[0])
        return -jnp.mean(jax.nn.log_softmax(h @ p[1])[jnp.arange(len(y)), y])
    return [w - 0.1 * g for w, g in zip(params, jax.grad(loss)(params))]


def _probe_args():
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.normal(size=s), jnp.float32)
            for s in ((2, 16, 16, 32), (3, 3, 32, 32), (16, 32), (32, 8))]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's options")
def test_cpu_choice_is_the_default_less_ynnpack_convolutions():
    """The option list is XLA:CPU's default YNNPACK fusions (the list plus convolutions
    compiles exactly as no option does) without convolutions, which then leave YNNPACK
    while the dot, elementwise and reduction fusions stay."""
    args = _probe_args()
    key = "xla_cpu_experimental_ynn_fusion_type"
    auto = xla.compiler_options("auto")
    assert auto == {key: xla._CPU_YNN_NO_CONV}
    default = _hlo(_probe, *args)
    with_conv = {key: auto[key] + ",LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
    assert _hlo(_probe, *args, options=with_conv) == default   # jaxlib's default unchanged
    rng = np.random.default_rng(1)
    mlp = ([jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((64, 128), (128, 10))],
           jnp.asarray(rng.normal(size=(20, 64)), jnp.float32), jnp.arange(20) % 10)
    # (adding LIBRARY_FUSION_TYPE_ELTWISE, say, would change this program and its results)
    assert _hlo(_mlp_step, *mlp, options=with_conv) == _hlo(_mlp_step, *mlp) \
        == _hlo(_mlp_step, *mlp, options=auto)   # no convolution: compiled as by default
    tuned = _hlo(_probe, *args, options=auto)

    def conv_in_ynn(text):   # a YNNPACK fusion calls a computation holding the convolution
        callees = set(re.findall(r"%ynn_fusion\S* = .*?calls=(%[\w.\-]+)", text))
        return any(block.strip().split(" ", 1)[0] in callees and "convolution(" in block
                   for block in text.split("\n\n"))
    assert conv_in_ynn(default) and not conv_in_ynn(tuned)
    assert "ynn_fusion" in tuned   # the other library fusions stay
    for got, want in zip(xla.jit(_probe, auto)(*args), jax.jit(_probe)(*args)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)   # sums of 288 terms ~ 17


def test_settings_and_backends(monkeypatch):
    assert xla.compiler_options("default", "cpu") == {}
    if jax.default_backend() == "cpu":   # a jaxlib whose default is not the one checked
        monkeypatch.setattr(xla, "_cpu_choice_holds", lambda: False)
        assert xla.compiler_options("auto") == {}
    assert xla.compiler_options("auto", "gpu") == xla.compiler_options("auto", "tpu") == {}
    with pytest.raises(ValueError, match="engine.xla = 'fast'"):
        xla.compiler_options("fast")


def test_bad_engine_xla_is_one_line():
    import default  # noqa: PLC0415 — configs/ on the path above
    c = default.get_config()
    c.engine.xla = "fastest"
    with pytest.raises(ConfigError, match=r"^config.engine.xla = 'fastest': must be one of"):
        validate_config(c)


def test_a_tuned_program_nests_inside_another_jit():
    """jax refuses compiler_options on a nested jit: xla.jit falls back to a plain one
    there (a runner inside a whole round compiled at once), and agrees with itself to rounding."""
    f = xla.jit(lambda x: jnp.tanh(x) * 2)   # this backend's options (CPU: some)
    x = jnp.linspace(-1.0, 1.0, 7)
    np.testing.assert_allclose(jax.jit(lambda y: f(y) + 1)(x), f(x) + 1, rtol=1e-6)
    # ... also when the nested call's arguments are constants, not the outer trace's
    np.testing.assert_allclose(jax.jit(lambda y: f(x) + y)(x), f(x) + x, rtol=1e-6)
