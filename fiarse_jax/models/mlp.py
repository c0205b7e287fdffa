"""A multilayer perceptron (flattens its input): the fastest model on CPU."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
    """Dense-ReLU stack; layers are ``Dense_0 … Dense_L`` (one layer-scope group each)."""

    hidden_sizes: Sequence[int] = (128,)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for h in self.hidden_sizes:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.num_classes)(x)
