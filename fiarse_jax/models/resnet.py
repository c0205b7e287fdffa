"""CIFAR ResNet-18 with static BatchNorm, the authors' model for CIFAR-10/100.

Architecture (the usual CIFAR variant): 3×3 stem conv (stride 1) + BN + ReLU, no
max-pool; stages of BasicBlocks (3×3 conv-BN-ReLU, 3×3 conv-BN, + shortcut, ReLU),
stride 2 and a 1×1 conv + BN shortcut at the first block of every stage but the
first; global average pool; ``Dense(num_classes)``. Convs have no bias. With the
defaults and 10 classes: 11,173,962 parameters (BN γ/β included).

Early exits (``early_exits=True``, for ``scalefl``): after every stage but the last an
exit head ``exit{s}`` (global average pool → ``Dense(num_classes)``, initialised like
``head``) reads stage s's stream; ``head`` is the last exit. ``__call__(x, exits=True)``
returns every exit's logits stacked ``[S, B, K]``, shallowest first; ``exits=False``
returns ``head``'s logits exactly as without exits (the heads are not computed). With
the defaults and 10 classes the three heads add 650 + 1,290 + 2,570 = 4,510 parameters.

"Static BN" (HeteroFL's and the FIARSE authors'): γ and β but no running
statistics; every call normalises with the current batch's statistics, in training
and evaluation alike. The tree therefore has only a ``params`` collection.

Parameter tree (top-level modules = the authors' layer-wise scope groups)::

    stem    {conv: {kernel}, bn: {scale, bias}}
    stageS  {blockB: {conv1, bn1, conv2, bn2[, shortcut: {conv, bn}]}}   S = 1..4
    exitS   {kernel, bias}        S = 1..3, only with early_exits=True
    head    {kernel, bias}

``masks.default_maskable`` then masks every conv kernel (shortcuts included) and
the head's kernel and bias, and never a BN leaf (its module has a ``scale``).

Widths for structured methods: ``widths[s]`` is the width of residual stream s
(the stem writes stream 1, stage 1 keeps it: identity shortcuts); ``inner_widths``
(one entry per block, stage-major; empty = each block's stage width) is the width
of each block's conv1 output. See ``unit_groups``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from fiarse_jax.core import units
from fiarse_jax.models import conv as conv_lib

#: PyTorch's default conv/linear weight init (kaiming_uniform, a=√5): U(±1/√fan_in),
#: so magnitudes (what FIARSE ranks) start on the authors' scale.
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class StaticBatchNorm(nn.Module):
    """BatchNorm over all axes but the last, always with the batch's own statistics.

    Params ``scale`` (γ, init 1) and ``bias`` (β, init 0); biased variance, as
    PyTorch normalises. No running averages: train and eval compute the same thing.
    """

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        axes = tuple(range(x.ndim - 1))
        mean = x.mean(axes)
        var = jnp.square(x - mean).mean(axes)
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


def _conv(features: int, size: int, stride: int, name: str, impl: str) -> nn.Conv:
    pad = (size - 1) // 2   # PyTorch-style symmetric padding (SAME pads 0/1 at stride 2)
    return nn.Conv(features, (size, size), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False,
                   kernel_init=torch_default_init, name=name,
                   conv_general_dilated=conv_lib.conv_general_dilated(impl))


def _classifier(num_classes: int, fan_in: int, name: str) -> nn.Dense:
    """Pooled stream → classes (``head`` and the exit heads): PyTorch's Linear init,
    kernel and bias U(±1/√fan_in)."""
    return nn.Dense(num_classes, kernel_init=torch_default_init,
                    bias_init=_uniform(1.0 / math.sqrt(fan_in)), name=name)


class ConvBN(nn.Module):
    """Conv (no bias) + static BN: the stem and the projection shortcuts."""

    features: int
    size: int = 3
    stride: int = 1
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return StaticBatchNorm(name="bn")(
            _conv(self.features, self.size, self.stride, "conv", self.conv)(x))


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x)); ``inner`` = conv1's width."""

    features: int
    inner: int
    stride: int = 1
    projection: bool = False   # 1×1 conv + BN shortcut (first block of stages 2+)
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv1 = _conv(self.inner, 3, self.stride, "conv1", self.conv)
        y = nn.relu(StaticBatchNorm(name="bn1")(conv1(x)))
        y = StaticBatchNorm(name="bn2")(_conv(self.features, 3, 1, "conv2", self.conv)(y))
        if self.projection:
            x = ConvBN(self.features, 1, self.stride, self.conv, name="shortcut")(x)
        return nn.relu(y + x)


class Stage(nn.Module):
    """Blocks ``block1 … blockB`` writing one residual stream of width ``features``."""

    features: int
    inner_widths: Sequence[int]
    stride: int = 1
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for b, inner in enumerate(self.inner_widths):
            x = BasicBlock(self.features, inner, self.stride if b == 0 else 1,
                           projection=b == 0 and self.stride != 1, conv=self.conv,
                           name=f"block{b + 1}")(x)
        return x


class ResNet18(nn.Module):
    """CIFAR ResNet (18 layers by default) with static BN; input NHWC float32.

    ``widths``: residual-stream width per stage (the stem writes stage 1's stream).
    ``blocks_per_stage``: BasicBlocks per stage. ``inner_widths``: conv1 width of
    every block, stage-major (empty: the stage's width). Stage s ≥ 2 starts with
    stride 2 and a projection shortcut; stage 1 (stride 1, same width as the stem)
    has identity shortcuts only, so its stream is the stem's. ``early_exits``: an exit
    head ``exit{s}`` after every stage s but the last (see the module docstring).
    """

    widths: Sequence[int] = (64, 128, 256, 512)
    blocks_per_stage: Sequence[int] = (2, 2, 2, 2)
    inner_widths: Sequence[int] = ()
    num_classes: int = 10
    early_exits: bool = False
    #: how convolutions run (``models.conv.CONV_IMPLS``): "auto" picks per backend.
    conv: str = "auto"
    #: a norm after every conv (HeteroFL's 1/r scaler is absorbed by it; config checks).
    normalized = True
    depth_field: ClassVar[str | None] = "widths"   # its length: the exits (scalefl's check)

    def _inner(self) -> list[list[int]]:
        """Inner widths per stage, per block."""
        if len(self.blocks_per_stage) != len(self.widths):
            raise ValueError(f"blocks_per_stage {tuple(self.blocks_per_stage)} needs one "
                             f"entry per stage ({len(self.widths)} widths)")
        flat = list(self.inner_widths) or [w for w, n in zip(self.widths, self.blocks_per_stage)
                                           for _ in range(n)]
        if len(flat) != sum(self.blocks_per_stage):
            raise ValueError(f"inner_widths has {len(flat)} entries; expected one per block "
                             f"({sum(self.blocks_per_stage)})")
        out, i = [], 0
        for n in self.blocks_per_stage:
            out.append(flat[i:i + n])
            i += n
        return out

    @nn.compact
    def __call__(self, x: jax.Array, exits: bool = False) -> jax.Array:
        if exits and not self.early_exits:
            raise ValueError("ResNet18(early_exits=False) has no exit heads; "
                             "call it with exits=False")
        x = nn.relu(ConvBN(self.widths[0], 3, 1, self.conv, name="stem")(x))
        outs = []
        last = len(self.widths) - 1
        for s, (w, inner) in enumerate(zip(self.widths, self._inner())):
            x = Stage(w, tuple(inner), 1 if s == 0 else 2, self.conv, name=f"stage{s + 1}")(x)
            if self.early_exits and s < last:
                head = _classifier(self.num_classes, x.shape[-1], f"exit{s + 1}")
                # Heads are created at init; with exits=False they are not computed.
                if exits or self.is_initializing():
                    outs.append(head(x.mean(axis=(1, 2))))
        logits = _classifier(self.num_classes, x.shape[-1], "head")(x.mean(axis=(1, 2)))
        if exits:
            return jnp.stack(outs + [logits])
        return logits

    def exit_names(self) -> list[str]:
        """The classifiers, shallowest first: ``exit1 … exit{S-1}`` (early exits), ``head``."""
        n = len(self.widths) - 1 if self.early_exits else 0
        return [f"exit{s + 1}" for s in range(n)] + ["head"]

    def layer_names(self) -> list[str]:
        """Top-level modules in forward order, i.e. the layer-scope groups: stem, stage1
        … stageS, head (with early exits ``exit{s}`` follows ``stage{s}``)."""
        exits = self.exit_names()[:-1]
        names = ["stem"]
        for s in range(len(self.widths)):
            names.append(f"stage{s + 1}")
            if s < len(exits):
                names.append(exits[s])
        return names + ["head"]

    def output_cuts(self) -> dict:
        """Where an empty sub-model cuts the input off (``connectivity``): the stem conv,
        a projecting block when both its conv path and its shortcut are empty, and the
        head; identity blocks never cut (their shortcut carries the stream)."""
        cuts: dict = {"stem": [[("stem", "conv", "kernel")]]}
        for s, b, projection in self._blocks():
            if projection:
                at = (f"stage{s}", f"block{b}")
                cuts["/".join(at)] = [[at + ("conv1", "kernel"), at + ("conv2", "kernel")],
                                      [at + ("shortcut", "conv", "kernel")]]
        cuts["head"] = [[("head", "kernel")]]
        return cuts

    def _blocks(self):
        """(stage index s ≥ 1, block index b ≥ 1, has projection) in forward order."""
        return [(s + 1, b + 1, s > 0 and b == 0)
                for s, n in enumerate(self.blocks_per_stage) for b in range(n)]

    def unit_groups(self, params) -> list[units.UnitGroup]:
        """Channel groups: one per residual stream and one per block's conv1 output.

        Stream s (``stream{s}``) is tied by the additions: its producers are every
        conv writing to it on the output axis (the stem for s = 1, the first block's
        projection for s ≥ 2, every block's conv2) and the BN γ/β after each; its
        consumers are the input axis of every conv reading it (the conv1 of every block
        of stage s except a projecting first block, stage s+1's first conv1 and
        projection) and, for the last stream, the head's kernel (with early exits, stream
        s < S is also read by ``exit{s}``'s kernel). ``stage{s}.block{b}`` is the block's
        conv1 output channels (conv1 and bn1 produce, conv2 consumes). Classes and the
        image channels are always kept.
        """
        def conv_bn(conv: tuple, bn: tuple) -> tuple[units.Member, ...]:
            """A conv's output axis and the γ, β of the BN after it."""
            return (units.Member(conv + ("kernel",), 3), units.Member(bn + ("scale",), 0),
                    units.Member(bn + ("bias",), 0))

        stages = range(1, len(self.widths) + 1)
        prod: dict[int, list] = {s: [] for s in stages}
        cons: dict[int, list] = {s: [] for s in stages}
        inner: dict[int, list] = {s: [] for s in stages}
        prod[1] += conv_bn(("stem", "conv"), ("stem", "bn"))
        for s, b, proj in self._blocks():
            blk = (f"stage{s}", f"block{b}")
            reads = s - 1 if proj else s     # the stream the block's input belongs to
            cons[reads].append(units.Member(blk + ("conv1", "kernel"), 2))
            if proj:
                cons[reads].append(units.Member(blk + ("shortcut", "conv", "kernel"), 2))
                prod[s] += conv_bn(blk + ("shortcut", "conv"), blk + ("shortcut", "bn"))
            prod[s] += conv_bn(blk + ("conv2",), blk + ("bn2",))
            inner[s].append(units.UnitGroup(
                f"stage{s}.block{b}", units.leaf(params, blk + ("conv1", "kernel")).shape[-1],
                conv_bn(blk + ("conv1",), blk + ("bn1",)),
                (units.Member(blk + ("conv2", "kernel"), 2),)))
        for s, name in zip(stages[-len(self.exit_names()):], self.exit_names()):
            if name in params:   # the classifiers reading each stream (exits, head)
                cons[s].append(units.Member((name, "kernel"), 0))
        groups = []
        for s in stages:
            size = units.leaf(params, prod[s][0].path).shape[-1]
            groups += [units.UnitGroup(f"stream{s}", size, tuple(prod[s]), tuple(cons[s]))]
            groups += inner[s]
        return units.check_groups(params, groups)   # every member axis has the group's size

    def with_widths(self, widths: dict[str, int]) -> ResNet18:
        """The same architecture with the groups' kept widths (for ``units.shrink``):
        ``stream{s}`` → ``widths[s-1]``, ``stage{s}.block{b}`` → that block's inner width."""
        inner = [w for row in self._inner() for w in row]
        return self.clone(
            widths=tuple(widths.get(f"stream{s + 1}", w) for s, w in enumerate(self.widths)),
            inner_widths=tuple(widths.get(f"stage{s}.block{b}", w)
                               for (s, b, _), w in zip(self._blocks(), inner)))

    def with_depth(self, depth: int) -> ResNet18:
        """The first ``depth`` stages, reading out through exit ``depth`` (its ``head``)."""
        n = len(self.widths)
        if not 1 <= depth <= n:
            raise ValueError(f"depth {depth} not in [1, {n}] (stages)")
        inner = self._inner()[:depth]
        return self.clone(widths=tuple(self.widths[:depth]),
                          blocks_per_stage=tuple(self.blocks_per_stage[:depth]),
                          inner_widths=tuple(w for row in inner for w in row)
                          if self.inner_widths else ())

    def depth_params(self, params, depth: int):
        """Parameters of ``with_depth(depth)`` taken from this model's: ``stem``,
        ``stage1 … stage{d}``, exits ``exit1 … exit{d-1}``, and exit ``exit{d}`` as the new
        ``head`` (for d = S the tree is returned unchanged)."""
        n = len(self.widths)
        if not 1 <= depth <= n:
            raise ValueError(f"depth {depth} not in [1, {n}] (stages)")
        if depth == n:
            return params
        if not self.early_exits:
            raise ValueError("a depth-reduced ResNet18 needs early_exits=True "
                             "(its exit is the readout)")
        out = {"stem": params["stem"]}
        out.update({f"stage{s + 1}": params[f"stage{s + 1}"] for s in range(depth)})
        out.update({f"exit{s + 1}": params[f"exit{s + 1}"] for s in range(depth - 1)})
        out["head"] = params[f"exit{depth}"]
        return out
