"""Export one capacity's sub-model from a run's checkpoint, and load it for inference.

``fiarse-jax export --workdir DIR --capacity 1/4 --out FILE.npz`` writes

* ``FILE.npz``: ``params/<layer>/<name>``, the sub-model's values exactly as the run
  evaluated it (``policy.apply``: x ⊙ 1[|x| ≥ θ_r] for FIARSE, leading units for
  HeteroFL, ...); ``mask/<layer>/<name>``, the 0/1 mask (uint8) of the coordinates
  the sub-model holds; and, for structured methods, ``dense/<layer>/<name>``, the
  physically smaller dense arrays of the shrunk sub-model (fewer units; for
  depth-reduced ``scalefl`` levels fewer layers / ResNet stages, with the deepest kept
  exit head as the dense model's output layer).
* ``FILE.json``: method, capacity, round, the model to build (full and, when
  present, the shrunk dense one), parameter counts, file size and the accuracy the
  run reported for this sub-model on the pooled test set.

``load_submodel(FILE)`` rebuilds the model and returns a ``SubModel`` whose
``predict(x)`` gives the logits (from the dense arrays when there are any, else the
masked full-size model); its accuracy on the run's test data equals the reported one.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fiarse_jax import models, policies
from fiarse_jax.core.capacities import capacity_label
from fiarse_jax.core.masks import path_names
from fiarse_jax.data import augment
from fiarse_jax.experiment import build, checkpoint, costs
from fiarse_jax.experiment.config import ConfigError
from fiarse_jax.experiment.metrics import write_atomic
from fiarse_jax.utils import paths

FORMAT = "fiarse_jax.submodel/1"


def _flat(tree, prefix: str) -> dict[str, np.ndarray]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {prefix + "/".join(path_names(p)): np.asarray(v) for p, v in flat}


def _unflat(arrays: dict[str, np.ndarray], prefix: str) -> dict:
    out: dict = {}
    for key, value in arrays.items():
        if not key.startswith(prefix):
            continue
        node = out
        *head, last = key[len(prefix):].split("/")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = jnp.asarray(value)
    return out


def parse_capacity(text: str, capacities) -> int:
    """Level index of ``text`` ('0.25', '1/4', '.25') among the run's capacities."""
    labels = [capacity_label(c) for c in capacities]
    try:
        num, _, den = str(text).partition("/")
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        value = None
    for i, (c, l) in enumerate(zip(capacities, labels)):
        if text == l or (value is not None and abs(value - c) < 1e-9):
            return i
    raise ConfigError(f"--capacity {text!r}: the run has capacities {', '.join(labels)}")


def load_run_state(workdir: str) -> tuple[build.Run, Any, int, dict]:
    """(run, params, rounds done, checkpoint meta) from the run directory's latest checkpoint."""
    ck_dir = os.path.join(workdir, "checkpoints")
    if not paths.isdir(ck_dir):
        raise ConfigError(f"--workdir {workdir!r} holds no checkpoints/ (run it with "
                          "config.checkpoint_every > 0 first)")
    ck = checkpoint.RunCheckpoints(workdir, read_only=True)   # never disturbs a running save
    try:
        latest, warnings = ck.latest_meta()
        if latest is None:
            raise ConfigError(f"--workdir {workdir!r}: no readable checkpoint"
                              + (f" ({'; '.join(warnings)})" if warnings else ""))
        # The checkpoint holds every parameter: no need to find pretrained weights again.
        run = build.build_run(ml_collections.ConfigDict(latest[1]["config"]), pretrained=False)
        restored, warnings = ck.restore_latest(
            checkpoint.run_state(run.init_params, 0, run.train_key, run.assignment))
    finally:
        ck.close()
    if restored is None:
        raise ConfigError(f"--workdir {workdir!r}: no readable checkpoint ({'; '.join(warnings)})")
    step, state, meta = restored
    return run, state["params"], step, meta


def export_submodel(workdir: str, capacity: str, out: str) -> dict:
    """Write ``out`` (.npz) and ``out`` with .json (see module docstring); returns the JSON."""
    if not out.endswith(".npz"):
        raise ConfigError(f"--out {out!r}: the file name must end in .npz")
    run, params, rounds, meta = load_run_state(workdir)
    level = parse_capacity(capacity, run.capacities)
    label = capacity_label(run.capacities[level])
    spec = run.policy.client_spec(run.eval_state(params, rounds), level, run.eval_key)
    sub = run.policy.apply(params, spec)
    mask = run.policy.mask(params, spec)
    arrays = {**_flat(sub, "params/"),
              **{k: v.astype(np.uint8) for k, v in _flat(mask, "mask/").items()}}
    cfg = meta["config"]
    model_opts = _model_options(run.model, {k: v for k, v in cfg["model"].items()
                                            if k not in models.RUN_MODEL_FIELDS}, None)
    info: dict[str, Any] = {
        "format": FORMAT, "method": cfg["method"], "capacity": run.capacities[level],
        "label": label, "round": rounds, "num_classes": run.data.num_classes,
        "input_shape": list(run.data.test_x.shape[1:]),
        # predict() applies the dataset's evaluation transform (uint8 → normalised, with the
        # run's constants)
        "input_transform": cfg["data"]["name"] if run.eval_transform is not None else None,
        "input_normalisation": _normalisation(run.eval_transform),
        "model": {"name": cfg["model"]["name"], "options": model_opts},
        "params_total": int(sum(v.size for v in jax.tree_util.tree_leaves(params))),
        "params_held": int(sum(float(np.asarray(m).sum()) for m in jax.tree_util.tree_leaves(mask))),
    }
    if cfg["method"] in policies.STRUCTURED and run.unit_groups is not None:
        small, dense = costs.shrunk_submodel(run.model, sub, spec, run.unit_groups)
        arrays.update(_flat(dense, "dense/"))
        info["dense_model"] = {"name": cfg["model"]["name"],
                               "options": _model_options(small, model_opts, run.model)}
        info["dense_params"] = int(sum(v.size for v in jax.tree_util.tree_leaves(dense)))
    history = meta["history"]
    last = history[-1] if history else {}
    info["reported"] = {"round": last.get("round"),
                        "capacity_global_accuracy": last.get("capacity_global_accuracy", {}).get(label),
                        "local_accuracy": last.get("local_accuracy", {}).get(label)}
    paths.makedirs(os.path.dirname(paths.absolute(out)))
    buf = io.BytesIO()   # written whole (gs:// too): never half-written
    np.savez_compressed(buf, **arrays)
    write_atomic(out, buf.getvalue())
    info["file_bytes"] = len(buf.getvalue())
    write_atomic(out[:-len(".npz")] + ".json", json.dumps(info, indent=2))
    return info


def _model_options(small_model, base: dict, full_model) -> dict:
    """The model's own fields, as JSON values: those the config names and every other
    field that differs from ``full_model``'s (the shrinking changed it: a ResNet's
    ``inner_widths``, its ``blocks_per_stage`` when depth-reduced) or, with no
    ``full_model``, from the class default (the data fixed it: a tokenizer's
    ``vocab_size``), so the model is rebuilt exactly."""
    def reference(f):
        return f.default if full_model is None else getattr(full_model, f.name)

    keys = list(base) + sorted(
        f.name for f in dataclasses.fields(small_model)
        if f.name not in base and f.name not in ("parent", "name", "num_classes")
        and getattr(small_model, f.name) != reference(f))
    out = {}
    for k in keys:
        v = getattr(small_model, k)
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


class SubModel(NamedTuple):
    model: Any
    params: Any
    info: dict
    transform: Any = None   # the run's evaluation transform of raw inputs, or None

    def predict(self, x) -> jax.Array:
        """Logits of the exported sub-model for raw inputs as the dataset stores them."""
        x = jnp.asarray(x)
        if self.transform is not None:
            x = self.transform(x)
        return self.model.apply({"params": self.params}, x)


def load_submodel(path: str) -> SubModel:
    """The exported sub-model of ``path`` (.npz beside its .json), ready for ``predict``."""
    info = json.loads(paths.read_text(path[:-len(".npz")] + ".json"))
    if info.get("format") != FORMAT:
        raise ValueError(f"{path!r}: not a {FORMAT} export (format {info.get('format')!r})")
    with np.load(io.BytesIO(paths.read_bytes(path))) as z:
        arrays = {k: z[k] for k in z.files}
    spec = info.get("dense_model") or info["model"]
    model = models.build_model(spec["name"], info["num_classes"], spec["options"])
    params = _unflat(arrays, "dense/" if "dense_model" in info else "params/")
    transform = None
    norm = info.get("input_normalisation")
    if norm:
        transform = augment.cifar_eval_transform(norm["mean"], norm["std"])
    elif info.get("input_transform"):   # a transform whose constants were not written
        raise ValueError(f"{path!r}: the inputs of dataset {info['input_transform']!r} go "
                         "through an evaluation transform this export does not record (an "
                         "older fiarse-jax, or an eval_transform without .normalisation); "
                         "export it again, or rebuild the model from the arrays yourself")
    return SubModel(model, params, info, transform)


def _normalisation(transform) -> dict | None:
    """The (mean, std) an evaluation transform normalises with, as lists (None: none)."""
    norm = getattr(transform, "normalisation", None)
    return ({"mean": [float(v) for v in norm["mean"]], "std": [float(v) for v in norm["std"]]}
            if norm else None)
