"""A small CNN for 8×8 (or larger) images."""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from fiarse_jax.core import connectivity, units
from fiarse_jax.models import conv as conv_lib


class CNN(nn.Module):
    """3×3 conv-ReLU blocks (2×2 max-pool after each but the last), then dense layers."""

    features: Sequence[int] = (16, 32)
    hidden_sizes: Sequence[int] = (64,)
    num_classes: int = 10
    #: how convolutions run (``models.conv.CONV_IMPLS``): "auto" picks per backend.
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        impl = conv_lib.conv_general_dilated(self.conv)
        for i, f in enumerate(self.features):
            x = nn.relu(nn.Conv(f, (3, 3), conv_general_dilated=impl)(x))
            if i < len(self.features) - 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        for h in self.hidden_sizes:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.num_classes)(x)

    def layer_names(self) -> list[str]:
        return ([f"Conv_{i}" for i in range(len(self.features))]
                + [f"Dense_{i}" for i in range(len(self.hidden_sizes) + 1)])

    def output_cuts(self) -> dict:
        """Every layer's kernel cuts the input off when empty (``connectivity``)."""
        return connectivity.chain_cuts(self.layer_names())

    def unit_groups(self, params) -> list[units.UnitGroup]:
        """Output channels of every conv and hidden dense layer (classes stay full)."""
        return units.chain_groups(params, self.layer_names())

    def with_widths(self, widths: dict[str, int]) -> CNN:
        """The same architecture with the groups' kept widths (for ``units.shrink``)."""
        conv = [f"Conv_{i}" for i in range(len(self.features))]
        dense = [f"Dense_{i}" for i in range(len(self.hidden_sizes))]
        return self.clone(
            features=tuple(widths.get(n, f) for n, f in zip(conv, self.features)),
            hidden_sizes=tuple(widths.get(n, h) for n, h in zip(dense, self.hidden_sizes)))
