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
