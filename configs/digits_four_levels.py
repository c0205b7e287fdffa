"""The paper's four capacity sizes {1, 1/4, 1/16, 1/64} on digits (60 clients, 15 per level).

Run:
  fiarse-jax --config configs/digits_four_levels.py --workdir runs/four_levels
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config():
    config = default.get_config()
    config.capacities = (1.0, 1 / 4, 1 / 16, 1 / 64)
    config.data.num_clients = 60
    return config
