"""Hugging Face RoBERTa weights (``.safetensors``) → a ``RobertaClassifier`` parameter tree.

The FIARSE authors fine-tune from pretrained ``roberta-base``. This module maps every
Hugging Face tensor name explicitly to our path with its layout change (HF ``Linear``
weights are ``[out, in]``; ours are ``[in, …out]`` kernels, with the attention heads as
their own axis), checks every shape against a template tree (e.g. ``model.init``'s), and
refuses a checkpoint that does not fit rather than returning a half-converted tree.

Accepted checkpoints: ``RobertaForSequenceClassification`` (``roberta.*`` + ``classifier.*``),
``RobertaForMaskedLM`` (``roberta.*`` + ``lm_head.*``, e.g. the hub's ``roberta-base``) and a
bare ``RobertaModel`` (names without the ``roberta.`` prefix). ``pooler.*``, ``lm_head.*``
and ``*.position_ids`` are ignored. Tensors must be float16/float32/float64 (NumPy has no
bfloat16); they are cast to the template's dtypes. No network access: use
``find_cached_checkpoint`` for a model already in the local Hugging Face cache.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fiarse_jax.core import units
from fiarse_jax.utils import hub

Params = Any

_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")
_IGNORED = (re.compile(r"^pooler\."), re.compile(r"^lm_head\."), re.compile(r"(^|\.)position_ids$"))


@dataclasses.dataclass
class ConversionReport:
    """What ``load_hf_roberta`` did: which tensors it took, kept, ignored, and why."""

    source: str
    loaded: list[str] = dataclasses.field(default_factory=list)   # our paths filled from the file
    kept_from_template: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)  # HF names not used
    notes: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.source}: {len(self.loaded)} tensors loaded, "
                 f"{len(self.kept_from_template)} kept from the template, "
                 f"{len(self.ignored)} checkpoint tensors ignored"]
        return "\n".join(lines + [f"  {n}" for n in self.notes])


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One tensor: HF name, our path, HF shape from ours, and the HF → ours conversion."""

    hf: str
    ours: tuple[str, ...]
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    convert: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]


def _copy(hf: str, ours: tuple[str, ...]) -> _Entry:
    return _Entry(hf, ours, lambda s: tuple(s), lambda a, s: a)


def _bias(hf: str, ours: tuple[str, ...]) -> _Entry:
    """A bias, flat in HF (``[H·hd]``), maybe per head in ours (``[H, hd]``)."""
    return _Entry(hf, ours, lambda s: (int(np.prod(s)),), lambda a, s: a.reshape(s))


def _linear(hf: str, ours: tuple[str, ...], n_in: int = 1) -> _Entry:
    """A Linear weight ``[out, in]`` → kernel ``[*in, *out]`` (``n_in`` input axes)."""
    def hf_shape(s):
        return (int(np.prod(s[n_in:])), int(np.prod(s[:n_in])))
    return _Entry(hf + ".weight", ours + ("kernel",), hf_shape, lambda a, s: a.T.reshape(s))


def _dense(hf: str, ours: tuple[str, ...], n_in: int = 1) -> list[_Entry]:
    return [_linear(hf, ours, n_in), _bias(hf + ".bias", ours + ("bias",))]


def _norm(hf: str, ours: tuple[str, ...]) -> list[_Entry]:
    return [_copy(hf + ".weight", ours + ("scale",)), _copy(hf + ".bias", ours + ("bias",))]


def name_map(num_layers: int) -> list[_Entry]:
    """The explicit HF name → our path map (HF names without the ``roberta.`` prefix)."""
    emb = "embeddings"
    out = [_copy(f"{emb}.word_embeddings.weight", (emb, "word", "embedding")),
           _copy(f"{emb}.position_embeddings.weight", (emb, "position", "embedding")),
           _copy(f"{emb}.token_type_embeddings.weight", (emb, "token_type", "embedding")),
           *_norm(f"{emb}.LayerNorm", (emb, "norm"))]
    for i in range(num_layers):
        hf, ours = f"encoder.layer.{i}", (f"layer_{i}",)
        att = ours + ("attention",)
        for p in ("query", "key", "value"):
            out += _dense(f"{hf}.attention.self.{p}", att + (p,))
        out += _dense(f"{hf}.attention.output.dense", att + ("output",), n_in=2)
        out += _norm(f"{hf}.attention.output.LayerNorm", ours + ("attention_norm",))
        out += _dense(f"{hf}.intermediate.dense", ours + ("mlp", "intermediate"))
        out += _dense(f"{hf}.output.dense", ours + ("mlp", "output"))
        out += _norm(f"{hf}.output.LayerNorm", ours + ("mlp_norm",))
    return out


def head_map() -> list[list[_Entry]]:
    """The classification head's two layers (each taken or kept as a whole)."""
    return [_dense("classifier.dense", ("head", "dense")),
            _dense("classifier.out_proj", ("head", "out_proj"))]


def _normalise(name: str) -> str:
    """HF name without ``roberta.``; old ``LayerNorm.gamma/beta`` as ``weight/bias``."""
    if name.startswith("roberta."):
        name = name[len("roberta."):]
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight",
                  re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def _checkpoint_file(path_or_dir: str | os.PathLike) -> Path:
    path = Path(path_or_dir).expanduser()
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors checkpoint at {path} (expected a .safetensors "
                                "file or a directory with model.safetensors; sharded checkpoints "
                                "are not supported)")
    return path


def load_hf_roberta(path_or_dir: str | os.PathLike, template_params: Params, *,
                    num_layers: int | None = None) -> tuple[Params, ConversionReport]:
    """Our parameter tree with every tensor taken from a Hugging Face RoBERTa checkpoint.

    ``template_params``: a ``RobertaClassifier`` tree (``params`` or ``{"params": …}``)
    giving the expected shapes and dtypes, and the classification head used when the
    checkpoint has none (a pretrained-only ``roberta-base``) or one of other shapes
    (another number of classes); the report says which. Shapes alone (``jax.eval_shape``)
    suffice when the checkpoint has a fitting head. ``num_layers``: by default the
    checkpoint must have exactly the template's encoder layers; pass the template's
    layer count to take the first ``num_layers`` layers of a deeper checkpoint.

    Raises ValueError listing every missing tensor and every shape mismatch (wrong layer
    count, hidden size, …); nothing is returned half-converted.
    """
    load_file = _safetensors_loader()
    wrapped = "params" in template_params and "embeddings" not in template_params
    template = template_params["params"] if wrapped else template_params
    model_layers = sum(1 for k in template if re.fullmatch(r"layer_\d+", k))
    if num_layers is not None and num_layers != model_layers:
        raise ValueError(f"num_layers={num_layers} but the template has {model_layers} "
                         "encoder layers")
    file = _checkpoint_file(path_or_dir)
    raw = load_file(str(file))
    report = ConversionReport(source=str(file))
    tensors, original = _read_tensors(raw, report)
    problems = _layer_problems(tensors, model_layers, num_layers, report)
    body = name_map(model_layers)
    problems += [p for p in (_misfit(e, tensors, template) for e in body) if p]
    if problems:
        raise ValueError(f"cannot convert {file} into this RobertaClassifier:\n  "
                         + "\n  ".join(problems))
    taken = body + _take_head(tensors, template, report)
    used = {e.hf for e in taken}
    report.ignored += [original[k] for k in tensors if k not in used]
    out = _fill(template, taken, tensors, report)
    return ({"params": out} if wrapped else out), report


def _safetensors_loader() -> Callable[[str], dict[str, np.ndarray]]:
    """``safetensors.numpy.load_file``, an optional dependency (the "text" extra)."""
    try:
        from safetensors.numpy import load_file
    except ImportError as e:
        raise ImportError("reading Hugging Face weights needs safetensors: "
                          "pip install 'fiarse-jax[text]' (or safetensors)") from e
    return load_file


def _read_tensors(raw: dict[str, np.ndarray], report: ConversionReport
                  ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The checkpoint's tensors by normalised name (``_normalise``), less the ignored ones
    (``_IGNORED``, added to ``report.ignored``), and each normalised name's name in the
    file. ValueError when two names normalise to the same one."""
    tensors: dict[str, np.ndarray] = {}
    original: dict[str, str] = {}          # normalised name -> name in the file
    for name, value in raw.items():
        key = _normalise(name)
        if any(p.search(key) for p in _IGNORED):
            report.ignored.append(name)
            continue
        if key in tensors:
            raise ValueError(f"checkpoint has {key!r} twice ({original[key]!r} and {name!r})")
        tensors[key], original[key] = value, name
    return tensors, original


def _layer_problems(tensors: dict[str, np.ndarray], model_layers: int, num_layers: int | None,
                    report: ConversionReport) -> list[str]:
    """Why the checkpoint's encoder layer count does not fit the model's (empty: it does;
    a deeper checkpoint with ``num_layers`` given fits, its first layers taken, as the
    report notes)."""
    ckpt_layers = {int(m.group(1)) for k in tensors if (m := _LAYER.match(k))}
    n_ckpt = max(ckpt_layers) + 1 if ckpt_layers else 0
    if n_ckpt == model_layers:
        return []
    if n_ckpt > model_layers and num_layers is not None:
        report.notes.append(f"took the first {model_layers} of the checkpoint's {n_ckpt} "
                            "encoder layers")
        return []
    hint = (f"; pass num_layers={model_layers} to take its first {model_layers}"
            if n_ckpt > model_layers else "")
    return [f"checkpoint has {n_ckpt} encoder layers, the model {model_layers}" + hint]


def _misfit(e: _Entry, tensors: dict[str, np.ndarray], template: Params) -> str | None:
    """None when the checkpoint's tensor for ``e`` fits the template; otherwise why not."""
    if e.hf not in tensors:
        return f"missing {e.hf}"
    want = e.hf_shape(tuple(units.leaf(template, e.ours).shape))
    got = tuple(tensors[e.hf].shape)
    if got != want:
        return f"shape mismatch {e.hf}: checkpoint {got}, model {want} (for {'/'.join(e.ours)})"
    return None


def _take_head(tensors: dict[str, np.ndarray], template: Params,
               report: ConversionReport) -> list[_Entry]:
    """The classification head's layers that fit the checkpoint (``head_map``: each layer
    taken or kept from the template as a whole, as the report notes). ValueError when a
    layer kept has only shapes in the template (``jax.eval_shape``)."""
    taken: list[_Entry] = []
    for layer in head_map():
        why = [p for p in (_misfit(e, tensors, template) for e in layer) if p]
        where = "/".join(layer[0].ours[:-1])
        if not why:
            taken += layer
            report.notes.append(f"{where}: from the checkpoint")
        else:
            report.kept_from_template += ["/".join(e.ours) for e in layer]
            report.notes.append(f"{where}: kept from the template ({'; '.join(why)})")
    shapeless = [p for p in report.kept_from_template
                 if isinstance(units.leaf(template, p.split("/")), jax.ShapeDtypeStruct)]
    if shapeless:
        raise ValueError(f"{', '.join(shapeless)} not taken from the checkpoint and the "
                         "template has only shapes (jax.eval_shape): pass initialised params")
    return taken


def _fill(template: Params, taken: list[_Entry], tensors: dict[str, np.ndarray],
          report: ConversionReport) -> Params:
    """``template`` with every ``taken`` tensor converted into its place (our layout, the
    template's dtype; added to ``report.loaded``); its other leaves as they are."""
    values = {}
    for e in taken:
        target = units.leaf(template, e.ours)
        values[e.ours] = np.asarray(e.convert(tensors[e.hf], tuple(target.shape)),
                                    dtype=target.dtype)
        report.loaded.append("/".join(e.ours))

    def fill(path, leaf):
        key = tuple(str(getattr(k, "key", k)) for k in path)
        return jax.numpy.asarray(values[key]) if key in values else leaf
    return jax.tree_util.tree_map_with_path(fill, template)


#: The hub cache (``HF_HUB_CACHE`` / ``HF_HOME`` …); one rule for weights and tokenizers.
hf_hub_cache = hub.cache_dir


def find_cached_checkpoint(repo_id: str = "roberta-base",
                           cache_dir: str | os.PathLike | None = None) -> Path | None:
    """``model.safetensors`` of ``repo_id`` in the local hub cache, or None (no network)."""
    return hub.cached_file(repo_id, "model.safetensors", cache_dir)


def load_pretrained(template_params: Params, source: str | os.PathLike = "roberta-base", *,
                    num_layers: int | None = None,
                    download: bool = False) -> tuple[Params, ConversionReport]:
    """``load_hf_roberta`` from ``source``: a ``.safetensors`` file or a directory holding
    ``model.safetensors``, or else a hub repo id (``roberta-base``) looked up in the local
    Hugging Face cache and, with ``download``, fetched from the hub when it is not there.
    FileNotFoundError (saying where it looked) when there is none."""
    path = Path(source).expanduser()
    if not path.exists():
        found = find_cached_checkpoint(str(source))
        if found is None and download:
            found = hub.download(str(source), "model.safetensors")
        if found is None:
            raise FileNotFoundError(
                f"{str(source)!r} is neither a file nor a directory, and not in the Hugging "
                f"Face cache at {hf_hub_cache()}; download it where there is network "
                f"(huggingface-cli download {source} model.safetensors) or pass a path")
        path = found
    return load_hf_roberta(path, template_params, num_layers=num_layers)


__all__ = ["ConversionReport", "find_cached_checkpoint", "hf_hub_cache", "head_map",
           "load_hf_roberta", "load_pretrained", "name_map"]
