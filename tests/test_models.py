"""Models: parameter counts by hand, and which leaves the default rule masks."""
import jax
import numpy as np

from fiarse_jax import models
from fiarse_jax.core import masks


def count(params):
    return sum(l.size for l in jax.tree_util.tree_leaves(params))


def test_mlp_param_count_and_maskability():
    m = models.build_model("mlp", 10, {"hidden_sizes": [128]})
    p = m.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32))["params"]
    assert count(p) == 64 * 128 + 128 + 128 * 10 + 10
    assert all(masks.maskable_flags(p))
    assert m.apply({"params": p}, np.zeros((3, 8, 8, 1), np.float32)).shape == (3, 10)


def test_cnn_param_count():
    m = models.build_model("cnn", 10, {"features": (16, 32), "hidden_sizes": (64,)})
    p = m.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32))["params"]
    conv = (3 * 3 * 1 * 16 + 16) + (3 * 3 * 16 * 32 + 32)
    dense = (4 * 4 * 32 * 64 + 64) + (64 * 10 + 10)  # one 2×2 pool: 8×8 → 4×4
    assert count(p) == conv + dense


def test_unknown_model():
    import pytest
    with pytest.raises(ValueError, match="unknown model 'resnet1000'"):
        models.build_model("resnet1000", 10)
