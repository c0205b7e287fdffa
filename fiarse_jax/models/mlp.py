"""A multilayer perceptron (flattens its input): the fastest model on CPU."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from fiarse_jax import units


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

    def layer_names(self) -> list[str]:
        return [f"Dense_{i}" for i in range(len(self.hidden_sizes) + 1)]

    def unit_groups(self, params) -> list[units.UnitGroup]:
        """Hidden units of every layer but the output (the class logits stay full)."""
        return units.chain_groups(params, self.layer_names())

    def with_widths(self, widths: dict[str, int]) -> "MLP":
        """The same architecture with the groups' kept widths (for ``units.shrink``)."""
        names = self.layer_names()
        return self.clone(hidden_sizes=tuple(widths.get(n, h)
                                             for n, h in zip(names, self.hidden_sizes)))
