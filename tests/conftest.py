"""Shared fixtures: small parameter trees with known maskability."""
import numpy as np
import pytest


def make_params(seed: int = 0, dtype=np.float32):
    """Dense + BatchNorm tree with distinct magnitudes (no ties) and plain NumPy leaves."""
    rng = np.random.default_rng(seed)
    n = 12 * 7 + 7 + 7 * 5 + 5
    mags = rng.permutation(np.linspace(0.01, 2.0, n)).astype(dtype)
    signs = rng.choice([-1.0, 1.0], n).astype(dtype)
    v = mags * signs
    params = {
        "Dense_0": {"kernel": v[:84].reshape(12, 7), "bias": v[84:91]},
        "BatchNorm_0": {"scale": rng.normal(size=7).astype(dtype),
                        "bias": rng.normal(size=7).astype(dtype) * 1e-3},
        "Dense_1": {"kernel": v[91:126].reshape(7, 5), "bias": v[126:131]},
    }
    return params


#: The maskable leaves of make_params(), written out by hand as the reference.
MASKABLE = [("Dense_0", "kernel"), ("Dense_0", "bias"), ("Dense_1", "kernel"), ("Dense_1", "bias")]


@pytest.fixture
def params():
    return make_params()


# One persistent XLA compilation cache for the test session, shared by the xdist workers
# and the subprocesses tests start (CLI runs, multi-process workers, the notebook's
# kernel): many tests compile the same programs (the default config's round, its
# evaluation) from fresh closures or fresh processes, which JAX's in-memory cache cannot
# share. The cache is transparent to results; it lives in a temporary folder removed at
# the end, and a cache the developer set (JAX_COMPILATION_CACHE_DIR) is left alone.
_CACHE_DIR = "JAX_COMPILATION_CACHE_DIR"
_MIN_TIME = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def pytest_configure(config):
    import os
    import tempfile

    if not os.environ.get(_CACHE_DIR):   # the controller, or a run without xdist
        os.environ[_CACHE_DIR] = tempfile.mkdtemp(prefix="fiarse-tests-xla-cache-")
        os.environ.setdefault(_MIN_TIME, "0.1")
        config._fiarse_made_cache = True
    import jax  # may already be imported, before these variables were set

    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_DIR])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get(_MIN_TIME, "1.0")))


def pytest_unconfigure(config):
    import os
    import shutil

    if getattr(config, "_fiarse_made_cache", False):
        shutil.rmtree(os.environ.pop(_CACHE_DIR), ignore_errors=True)


@pytest.fixture(autouse=True)
def _registries_left_as_found():
    """A dataset a test registers (e.g. benchmarks/suite.py's ``suite_random``, registered
    when a test builds a suite round in-process) is removed after it, so tests that list
    the registered datasets see the library's own whatever ran before them on the worker."""
    from fiarse_jax.data import DATASETS
    before = set(DATASETS)
    yield
    for name in set(DATASETS) - before:
        del DATASETS[name]
