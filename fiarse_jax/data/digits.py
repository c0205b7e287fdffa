"""scikit-learn's digits dataset (shipped in its wheel: no download, no options)."""
from __future__ import annotations

import numpy as np

from fiarse_jax.data.types import Dataset


def load_digits() -> Dataset:
    """scikit-learn's digits: 1,797 real 8×8 handwritten digits shipped in the wheel."""
    from sklearn.datasets import load_digits as _load
    d = _load()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    return Dataset(x=x, y=d.target.astype(np.int32), num_classes=10)
