"""A small CNN for 8×8 (or larger) images."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax


class CNN(nn.Module):
    """3×3 conv-ReLU blocks (2×2 max-pool after each but the last), then dense layers."""

    features: Sequence[int] = (16, 32)
    hidden_sizes: Sequence[int] = (64,)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, f in enumerate(self.features):
            x = nn.relu(nn.Conv(f, (3, 3))(x))
            if i < len(self.features) - 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        for h in self.hidden_sizes:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.num_classes)(x)
