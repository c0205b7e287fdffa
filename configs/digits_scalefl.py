"""ScaleFL/DepthFL-style baseline (simplified, see docs/scalefl.md) on digits.

A 3-hidden-layer MLP (64 → 128 → 128 → 128 → 10) with an early-exit head after the
first two hidden layers; capacities {1, 1/4, 1/16} get depths 3 / 2 / 1 (d = ⌈√r·3⌉)
and the widths that fill ≈ r·N parameters. Everything else is the default experiment.

Run:
  fiarse-jax --config configs/digits_scalefl.py --workdir runs/scalefl
  fiarse-jax compare --config configs/digits_scalefl.py --methods fiarse,heterofl,scalefl \\
      --workdir runs/cmp_scalefl
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config():
    config = default.get_config()
    config.method = "scalefl"
    config.model.hidden_sizes = (128, 128, 128)
    config.model.early_exits = True
    return config
