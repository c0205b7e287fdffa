"""A multilayer perceptron (flattens its input): the fastest model on CPU."""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from fiarse_jax.core import connectivity, units


class MLP(nn.Module):
    """Dense-ReLU stack; layers are ``Dense_0 … Dense_L`` (one layer-scope group each).

    With ``early_exits=True`` every hidden layer but the last also feeds an exit head
    ``Exit_i`` (Dense → classes on hidden layer i's ReLU output); the output layer
    ``Dense_L`` is the last exit. ``__call__(x, exits=True)`` then returns every exit's
    logits stacked ``[E, B, K]`` (E = number of hidden layers, shallowest first);
    ``exits=False`` returns the output layer's logits ``[B, K]`` as without exits.
    """

    hidden_sizes: Sequence[int] = (128,)
    num_classes: int = 10
    early_exits: bool = False
    #: the field whose length is the number of exits (config checks for ``scalefl``).
    depth_field: ClassVar[str | None] = "hidden_sizes"

    @nn.compact
    def __call__(self, x: jax.Array, exits: bool = False) -> jax.Array:
        if exits and not self.early_exits:
            raise ValueError("MLP(early_exits=False) has no exit heads; call it with exits=False")
        x = x.reshape((x.shape[0], -1))
        outs = []
        last = len(self.hidden_sizes) - 1
        for i, h in enumerate(self.hidden_sizes):
            x = nn.relu(nn.Dense(h, name=f"Dense_{i}")(x))
            if self.early_exits and i < last:
                head = nn.Dense(self.num_classes, name=f"Exit_{i}")
                # Heads are created at init; with exits=False they are not computed.
                if exits or self.is_initializing():
                    outs.append(head(x))
        logits = nn.Dense(self.num_classes, name=f"Dense_{last + 1}")(x)
        if exits:
            return jnp.stack(outs + [logits])
        return logits

    def layer_names(self) -> list[str]:
        return [f"Dense_{i}" for i in range(len(self.hidden_sizes) + 1)]

    def output_cuts(self) -> dict:
        """Every layer's kernel cuts the input off when empty (``connectivity``)."""
        return connectivity.chain_cuts(self.layer_names())

    def unit_groups(self, params) -> list[units.UnitGroup]:
        """Hidden units of every layer but the output (the class logits stay full).

        With early exits, hidden layer i's units are also read by ``Exit_i`` (a second
        consumer of group ``Dense_i``).
        """
        groups = units.chain_groups(params, self.layer_names())
        if not self.early_exits:
            return groups
        out = []
        for i, g in enumerate(groups):
            name = f"Exit_{i}"
            if name in params:
                k = params[name]["kernel"]
                head = units.Member((name, "kernel"), k.ndim - 2)
                g = g._replace(consumers=g.consumers + (head,))
            out.append(g)
        return out

    def with_widths(self, widths: dict[str, int]) -> MLP:
        """The same architecture with the groups' kept widths (for ``units.shrink``)."""
        names = self.layer_names()
        return self.clone(hidden_sizes=tuple(widths.get(n, h)
                                             for n, h in zip(names, self.hidden_sizes)))

    def with_depth(self, depth: int) -> MLP:
        """The first ``depth`` hidden layers, reading out through exit ``depth`` (early exits)."""
        if not 1 <= depth <= len(self.hidden_sizes):
            raise ValueError(f"depth {depth} not in [1, {len(self.hidden_sizes)}]")
        return self.clone(hidden_sizes=tuple(self.hidden_sizes[:depth]))

    def depth_params(self, params, depth: int):
        """Parameters of ``with_depth(depth)`` taken from this model's: hidden layers
        ``Dense_0 … Dense_{d-1}``, exits ``Exit_0 … Exit_{d-2}``, and exit ``Exit_{d-1}``
        as the new output layer ``Dense_d`` (for d = L the tree is returned unchanged)."""
        n = len(self.hidden_sizes)
        if not 1 <= depth <= n:
            raise ValueError(f"depth {depth} not in [1, {n}]")
        if depth == n:
            return params
        if not self.early_exits:
            raise ValueError("a depth-reduced MLP needs early_exits=True (its exit is the readout)")
        out = {f"Dense_{i}": params[f"Dense_{i}"] for i in range(depth)}
        out.update({f"Exit_{i}": params[f"Exit_{i}"] for i in range(depth - 1)})
        out[f"Dense_{depth}"] = params[f"Exit_{depth - 1}"]
        return out
