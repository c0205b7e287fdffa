"""RoBERTa sequence classifier, the FIARSE authors' text model (AG News, from ``roberta-base``).

The architecture is Hugging Face's ``RobertaForSequenceClassification`` in eval mode
(no dropout): word + position + token-type embeddings → LayerNorm; post-LayerNorm
encoder blocks (multi-head self-attention, exact-erf GELU MLP); classification head on
the first token (``<s>``): dense(d→d) → tanh → out_proj(d→K). Position ids follow
RoBERTa: ``cumsum(mask)·mask + pad_token_id`` with ``mask = ids != pad_token_id``, so
padded keys are masked out and a sequence's logits do not depend on its padding.
Pretrained weights come from ``fiarse_jax.models.convert_roberta``.

Parameter tree (other code relies on these names)::

    embeddings {word, position, token_type: {embedding}, norm: {scale, bias}}
    layer_i    {attention: {query|key|value: {kernel [d,H,hd], bias [H,hd]},
                            output: {kernel [H,hd,d], bias [d]}},
                attention_norm: {scale, bias},
                mlp: {intermediate: {kernel [d,ff], bias [ff]}, output: {kernel [ff,d], bias [d]}},
                mlp_norm: {scale, bias}}
    head       {dense: {kernel [d,d], bias [d]}, out_proj: {kernel [d,K], bias [K]}}

FIARSE (authors' text code): word and position embeddings and every encoder dense
kernel and bias are maskable; token-type embeddings, LayerNorms and the classifier
head are not (``is_maskable``). Layer scope: three θ groups — word embeddings,
position embeddings, and the whole encoder pooled (``threshold_groups="coarse"``) or one
per encoder layer (``"per_layer"``) (``threshold_group``). Structured methods drop whole
attention heads and MLP units per layer (``unit_groups`` / ``with_widths``).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fiarse_jax.core import units

#: Architecture presets (``RobertaClassifier.size``). ``roberta_base`` is Hugging Face's
#: ``roberta-base``; ``small`` and ``tiny`` keep its vocabulary and positions (so the
#: same tokenizer works) with a narrower, shallower encoder for CPU runs and tests.
PRESETS: dict[str, dict[str, int]] = {
    "roberta_base": dict(vocab_size=50265, hidden_size=768, num_layers=12, num_heads=12,
                         intermediate_size=3072, max_position_embeddings=514),
    "small": dict(vocab_size=50265, hidden_size=256, num_layers=4, num_heads=4,
                  intermediate_size=1024, max_position_embeddings=514),
    "tiny": dict(vocab_size=50265, hidden_size=64, num_layers=2, num_heads=2,
                 intermediate_size=128, max_position_embeddings=514),
}

THRESHOLD_GROUPS = ("coarse", "per_layer")

#: Hugging Face's ``initializer_range``: every kernel and embedding starts N(0, 0.02²).
hf_normal = nn.initializers.normal(0.02)


class RobertaDims(NamedTuple):
    """Resolved sizes of a ``RobertaClassifier`` (preset + overrides + per-layer widths)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int              # heads of the full model (sets head_dim)
    head_dim: int
    intermediate_size: int      # MLP width of the full model
    max_position_embeddings: int
    layer_heads: tuple[int, ...]         # kept heads per layer
    layer_intermediate: tuple[int, ...]  # kept MLP units per layer


def _embed_init(pad_row: int):
    """N(0, 0.02²) with row ``pad_row`` zeroed, as HF's ``_init_weights`` does for an
    embedding with ``padding_idx``."""
    def init(key, shape, dtype=jnp.float32):
        return hf_normal(key, shape, dtype).at[pad_row].set(0)
    return init


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    # Two-pass variance (E[(x-μ)²]) as PyTorch computes it, not E[x²] − μ².
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


class Embeddings(nn.Module):
    """Word + RoBERTa position + token-type (all 0) embeddings, then LayerNorm."""

    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    type_vocab_size: int
    pad_token_id: int
    eps: float

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        mask = (ids != self.pad_token_id).astype(jnp.int32)
        positions = jnp.cumsum(mask, axis=1) * mask + self.pad_token_id
        d = self.hidden_size
        x = nn.Embed(self.vocab_size, d, embedding_init=_embed_init(self.pad_token_id),
                     name="word")(ids)
        x = x + nn.Embed(self.max_position_embeddings, d,
                         embedding_init=_embed_init(self.pad_token_id), name="position")(positions)
        x = x + nn.Embed(self.type_vocab_size, d, embedding_init=hf_normal,
                         name="token_type")(jnp.zeros_like(ids))
        return _layer_norm(self.eps, "norm")(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``num_heads`` heads of ``head_dim`` each.

    ``key_bias`` [B, 1, 1, L] is added to the scores (0 for real tokens, a large negative
    number for padding). Softmax runs in float32 whatever the compute dtype.
    """

    num_heads: int
    head_dim: int
    hidden_size: int

    @nn.compact
    def __call__(self, x: jax.Array, key_bias: jax.Array) -> jax.Array:
        def proj(name: str) -> jax.Array:
            return nn.DenseGeneral((self.num_heads, self.head_dim), axis=-1, kernel_init=hf_normal,
                                   name=name)(x)
        q, k, v = proj("query"), proj("key"), proj("value")           # [B, L, H, hd]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        probs = jax.nn.softmax(scores / math.sqrt(self.head_dim) + key_bias, axis=-1)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
        return nn.DenseGeneral(self.hidden_size, axis=(-2, -1), kernel_init=hf_normal,
                               name="output")(ctx)


class Mlp(nn.Module):
    """dense(d→ff) → exact GELU (HF's "gelu") → dense(ff→d)."""

    intermediate_size: int
    hidden_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.intermediate_size, kernel_init=hf_normal, name="intermediate")(x)
        h = nn.gelu(h, approximate=False)
        return nn.Dense(self.hidden_size, kernel_init=hf_normal, name="output")(h)


class EncoderLayer(nn.Module):
    """Post-LayerNorm block: x ← LN(x + attn(x)); x ← LN(x + mlp(x))."""

    num_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array, key_bias: jax.Array) -> jax.Array:
        h = SelfAttention(self.num_heads, self.head_dim, self.hidden_size, name="attention")(
            x, key_bias)
        x = _layer_norm(self.eps, "attention_norm")(x + h)
        h = Mlp(self.intermediate_size, self.hidden_size, name="mlp")(x)
        return _layer_norm(self.eps, "mlp_norm")(x + h)


class ClassificationHead(nn.Module):
    """HF's ``RobertaClassificationHead`` on the first token: dense → tanh → out_proj."""

    hidden_size: int
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.tanh(nn.Dense(self.hidden_size, kernel_init=hf_normal, name="dense")(x[:, 0]))
        return nn.Dense(self.num_classes, kernel_init=hf_normal, name="out_proj")(h)


class RobertaClassifier(nn.Module):
    """RoBERTa for sequence classification; input int token ids ``[B, L]``, output ``[B, K]``.

    ``size`` picks a preset (``PRESETS``); ``vocab_size`` … ``max_position_embeddings``
    override it when non-zero. ``layer_heads`` / ``layer_intermediate`` (one entry per
    layer; empty = the full width) give the kept heads / MLP units of each layer for
    physically shrunk sub-models; the head size stays ``hidden_size // num_heads``
    (a width of 0 is allowed: the block then adds only its output bias).
    ``max_length`` is the data's sequence length, checked against the position table
    (RoBERTa positions run from ``pad_token_id + 1``). ``threshold_groups``,
    ``mask_token_type`` and ``mask_head`` configure FIARSE (see ``is_maskable`` and
    ``threshold_group``). Parameters are float32; the computation follows their dtype
    (e.g. bfloat16 when a client casts them), with the softmax in float32.
    """

    #: Inputs are token ids (``build_run`` refuses a dataset that is not text).
    takes_token_ids = True
    normalized = True   # LayerNorm after every sub-layer (see config's heterofl.scaler check)

    size: str = "roberta_base"
    vocab_size: int = 0
    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    intermediate_size: int = 0
    max_position_embeddings: int = 0
    type_vocab_size: int = 1
    pad_token_id: int = 1
    layer_norm_eps: float = 1e-5
    max_length: int = 0
    num_classes: int = 4
    layer_heads: Sequence[int] = ()
    layer_intermediate: Sequence[int] = ()
    threshold_groups: str = "coarse"
    mask_token_type: bool = False
    mask_head: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.dims()   # fail at construction (build_model) on a bad configuration

    def dims(self) -> RobertaDims:
        """The resolved sizes; ValueError naming the first inconsistent value."""
        if self.size not in PRESETS:
            raise ValueError(f"unknown RoBERTa size {self.size!r}; "
                             f"expected one of {sorted(PRESETS)}")
        preset = PRESETS[self.size]
        fields = {}
        for k, default in preset.items():
            v = getattr(self, k)
            if v < 0:
                raise ValueError(f"{k} must be >= 0 (0 = the preset's), got {v}")
            fields[k] = v or default
        d, heads, n = fields["hidden_size"], fields["num_heads"], fields["num_layers"]
        if d % heads:
            raise ValueError(f"hidden_size {d} is not a multiple of num_heads {heads}")
        if self.threshold_groups not in THRESHOLD_GROUPS:
            raise ValueError(f"unknown threshold_groups {self.threshold_groups!r}; "
                             f"expected one of {THRESHOLD_GROUPS}")
        if self.num_classes < 1 or self.type_vocab_size < 1:
            raise ValueError(f"num_classes {self.num_classes} and type_vocab_size "
                             f"{self.type_vocab_size} must be at least 1")
        per_layer = {}
        ff = fields["intermediate_size"]
        for name, full in (("layer_heads", heads), ("layer_intermediate", ff)):
            widths = tuple(int(w) for w in getattr(self, name)) or (full,) * n
            if len(widths) != n:
                raise ValueError(f"{name} has {len(widths)} entries {widths}; expected one per "
                                 f"layer ({n})")
            if min(widths) < 0:
                raise ValueError(f"{name} {widths} has a negative width")
            per_layer[name] = widths
        positions = fields["max_position_embeddings"]
        if not 0 <= self.pad_token_id < positions - 1:
            raise ValueError(f"pad_token_id {self.pad_token_id} leaves no positions in a table "
                             f"of {positions}")
        self._check_length(self.max_length, positions)
        return RobertaDims(vocab_size=fields["vocab_size"], hidden_size=d, num_layers=n,
                           num_heads=heads, head_dim=d // heads,
                           intermediate_size=ff,
                           max_position_embeddings=positions, **per_layer)

    def _check_length(self, length: int, positions: int) -> None:
        """RoBERTa positions of a length-L sequence reach ``L + pad_token_id``."""
        if length + self.pad_token_id + 1 > positions:
            raise ValueError(f"sequence length {length} needs {length + self.pad_token_id + 1} "
                             f"position embeddings (pad_token_id {self.pad_token_id} + 1 + length);"
                             f" max_position_embeddings is {positions}")

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        dm = self.dims()
        if ids.ndim != 2:
            raise ValueError(f"expected token ids [batch, length], got shape {ids.shape}")
        self._check_length(ids.shape[1], dm.max_position_embeddings)
        ids = ids.astype(jnp.int32)
        x = Embeddings(dm.vocab_size, dm.hidden_size, dm.max_position_embeddings,
                       self.type_vocab_size, self.pad_token_id, self.layer_norm_eps,
                       name="embeddings")(ids)
        pad = ids == self.pad_token_id
        key_bias = jnp.where(pad, jnp.finfo(jnp.float32).min, 0.0)[:, None, None, :]
        for i, (h, ff) in enumerate(zip(dm.layer_heads, dm.layer_intermediate)):
            x = EncoderLayer(h, dm.head_dim, dm.hidden_size, ff, self.layer_norm_eps,
                             name=f"layer_{i}")(x, key_bias)
        return ClassificationHead(dm.hidden_size, self.num_classes, name="head")(x)

    def load_pretrained(self, source: str, params, *, download: bool = False):
        """``params`` (this model's, e.g. from ``init``) with every tensor from a Hugging
        Face RoBERTa checkpoint: a ``.safetensors`` file, a directory with
        ``model.safetensors``, or a repo id in the local hub cache (``roberta-base``),
        fetched from the hub with ``download`` when the cache lacks it.

        The head comes from the checkpoint when it has one of the right shapes, else from
        ``params``. An explicit ``num_layers`` override shallower than the checkpoint takes
        its first layers. OSError / ValueError when nothing fits (see ``convert_roberta``).
        """
        from fiarse_jax.models import convert_roberta

        out, report = convert_roberta.load_pretrained(
            params, source, num_layers=self.dims().num_layers if self.num_layers else None,
            download=download)
        logging.getLogger(__name__).info("%s", report.summary())
        return out

    # -- FIARSE: which leaves are masked, and their layer-scope groups ----------------

    def _parts(self, path: Sequence[str]) -> tuple[str, ...]:
        """``path`` without a leading ``params``, checked against the tree's layout."""
        path = tuple(path)
        if path and path[0] == "params":
            path = path[1:]
        top = path[0] if path else ""
        known = top in ("embeddings", "head") or (
            top.startswith("layer_") and top[6:].isdigit())
        if not known or len(path) < 2:
            raise ValueError(f"{'/'.join(path)!r} is not a RobertaClassifier parameter path")
        return path

    def is_maskable(self, path: tuple[str, ...], leaf: Any = None) -> bool:
        """The authors' text rule: word and position embeddings and every encoder dense
        kernel and bias are maskable; token-type embeddings (unless ``mask_token_type``),
        every LayerNorm and the classification head (unless ``mask_head``) are not."""
        del leaf
        path = self._parts(path)
        top, sub = path[0], path[1]
        if top == "embeddings":
            return sub in ("word", "position") or (sub == "token_type" and self.mask_token_type)
        if top == "head":
            return self.mask_head
        return sub in ("attention", "mlp")          # not attention_norm / mlp_norm

    def threshold_group(self, path: tuple[str, ...]) -> Hashable:
        """Layer-scope θ group of a leaf (``masks.importance_thresholds(group_fn=...)``):
        ``word_embeddings``, ``position_embeddings``, ``token_type_embeddings``,
        ``embeddings_norm``, ``head``, and for an encoder leaf ``encoder`` (coarse: the
        authors' three groups) or its layer ``layer_i`` (``per_layer``)."""
        path = self._parts(path)
        top, sub = path[0], path[1]
        if top == "embeddings":
            return "embeddings_norm" if sub == "norm" else f"{sub}_embeddings"
        if top == "head":
            return "head"
        return "encoder" if self.threshold_groups == "coarse" else top

    # -- Structure for layer scope and structured (unit) methods ----------------------

    def layer_names(self) -> list[str]:
        """Top-level modules in forward order: embeddings, layer_0 … layer_{L-1}, head."""
        return ["embeddings"] + [f"layer_{i}" for i in range(self.dims().num_layers)] + ["head"]

    def unit_groups(self, params) -> list[units.UnitGroup]:
        """Per layer: ``layer_i.heads`` (attention heads) and ``layer_i.mlp`` (MLP units).

        A head is produced by the query/key/value kernels (axis 1) and biases (axis 0) and
        read by the attention output kernel (axis 0); an MLP unit by the intermediate
        kernel (axis 1) and bias (axis 0), read by the MLP output kernel (axis 0). A
        dropped head / unit then contributes exactly 0 to the residual stream. The hidden
        width (embeddings, LayerNorms, residual stream) and the head stay full.
        """
        groups = []
        for i in range(self.dims().num_layers):
            attn, mlp = (f"layer_{i}", "attention"), (f"layer_{i}", "mlp")
            qkv = [attn + (p,) for p in ("query", "key", "value")]
            groups.append(units.UnitGroup(
                f"layer_{i}.heads", units.leaf(params, attn + ("query", "kernel")).shape[1],
                tuple(units.Member(p + ("kernel",), 1) for p in qkv)
                + tuple(units.Member(p + ("bias",), 0) for p in qkv),
                (units.Member(attn + ("output", "kernel"), 0),)))
            groups.append(units.UnitGroup(
                f"layer_{i}.mlp", units.leaf(params, mlp + ("intermediate", "kernel")).shape[1],
                (units.Member(mlp + ("intermediate", "kernel"), 1),
                 units.Member(mlp + ("intermediate", "bias"), 0)),
                (units.Member(mlp + ("output", "kernel"), 0),)))
        return units.check_groups(params, groups)   # every member axis has the group's size

    def with_widths(self, widths: dict[str, int]) -> RobertaClassifier:
        """The same model with kept heads / MLP units per layer (``layer_i.heads``,
        ``layer_i.mlp``; missing groups keep their width), for ``units.shrink`` params."""
        dm = self.dims()
        return self.clone(
            layer_heads=tuple(int(widths.get(f"layer_{i}.heads", h))
                              for i, h in enumerate(dm.layer_heads)),
            layer_intermediate=tuple(int(widths.get(f"layer_{i}.mlp", f))
                                     for i, f in enumerate(dm.layer_intermediate)))
