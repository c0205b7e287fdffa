"""Models by name (``config.model.name``); each takes ``num_classes`` plus its own fields.

The registry (``MODELS``, ``register_model``) owns what config checks need: a model's
config fields are its dataclass fields (less ``num_classes``, set from the data); what
the methods and the run need is declared on the class:

* ``normalized``: a norm layer after every layer (HeteroFL's scaler needs it);
* ``depth_field: ClassVar[str | None]``: the field whose length is the number of
  early-exit stages (``scalefl``), ``None``/absent without early exits;
* ``takes_token_ids``: reads token ids (text data only);
* ``load_pretrained(source, params, *, download)``: can start from pretrained weights.

A ``conv`` field (``cnn``, ``resnet18``) picks how convolutions run (``models.conv``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn

from fiarse_jax.models.cnn import CNN
from fiarse_jax.models.conv import check as check_conv
from fiarse_jax.models.mlp import MLP
from fiarse_jax.models.resnet import ResNet18
from fiarse_jax.models.roberta import RobertaClassifier

MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN, "resnet18": ResNet18,
                                      "roberta": RobertaClassifier}

#: config.model fields that configure the run, not the Flax module (build_run, export).
RUN_MODEL_FIELDS = ("name", "pretrained")


def register_model(name: str, cls: type[nn.Module], *, replace: bool = False) -> type[nn.Module]:
    """Add a model to the registry (``config.model.name = name``).

    Args:
      name: the model's name (a Python identifier).
      cls: a Flax module class (a dataclass) with a ``num_classes`` field; its other
        fields are its config fields.
      replace: allow replacing a registered model.

    Returns:
      ``cls``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"model name {name!r}: must be a Python identifier")
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)
            and "num_classes" in {f.name for f in dataclasses.fields(cls)}):
        raise ValueError(f"model {name!r}: {cls!r} is not a module class with a "
                         "num_classes field")
    if name in MODELS and not replace:
        raise ValueError(f"model {name!r} is already registered (pass replace=True)")
    MODELS[name] = cls
    return cls


def unregister_model(name: str) -> type[nn.Module]:
    """Remove ``name`` from the registry; returns its class (``KeyError`` if absent)."""
    return MODELS.pop(name)


def model_fields(name: str) -> list[str]:
    """The config fields of model ``name``: its dataclass fields but ``num_classes``."""
    return sorted({f.name for f in dataclasses.fields(MODELS[name])}
                  - {"parent", "name", "num_classes"})


def check_model_config(section: Mapping[str, Any]) -> type[nn.Module]:
    """Validate ``config.model`` before anything is built.

    The model exists, every field is one of its fields (or a run field,
    ``RUN_MODEL_FIELDS``; ``pretrained`` a string), and sequence fields hold integers ≥ 1.

    Args:
      section: ``config.model`` (a dict or ``ConfigDict``) with ``name`` and fields.

    Returns:
      The model's class.

    Raises:
      ValueError: one line ``"model.<field> = <value!r>: ..."`` (``"model.name is
        missing"``); ``validate_config`` prefixes ``"config."``.
    """
    try:
        name = section["name"]
    except (KeyError, AttributeError, TypeError):
        raise ValueError("model.name is missing") from None
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"model.name = {name!r}: must be one of {sorted(MODELS)}")
    known = model_fields(name)
    for key, value in section.items():
        if key == "pretrained" and not isinstance(value, str):   # weights to start from
            raise ValueError(f"model.pretrained = {value!r}: must be a path, a hub name or ''")
        if key in RUN_MODEL_FIELDS:
            continue
        if key not in known:
            raise ValueError(f"model.{key} = {value!r}: is not a field of model {name!r}; "
                             f"fields: {known}")
        if key == "conv":
            check_conv(value)
        if isinstance(value, (tuple, list)) and not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
            raise ValueError(f"model.{key} = {tuple(value)!r}: every size must be an "
                             "integer ≥ 1")
    return MODELS[name]


def check_model_for_data(section: Mapping[str, Any], *, token_ids: bool, data_name: str,
                         text_datasets: Iterable[str] = ()) -> None:
    """The model's needs against the run's data (``build.build_model``'s checks).

    Args:
      section: ``config.model`` (its ``name`` registered).
      token_ids: the data gives token ids (``ds.model_options`` set).
      data_name: ``config.data.name``, for the message.
      text_datasets: dataset names to suggest to a token-id model.

    Raises:
      ValueError: ``"model.pretrained: model 'cnn' cannot load pretrained weights (only
        'roberta' can)"`` or ``"model.name = 'roberta' reads token ids; dataset 'digits'
        is not text (use 'ag_news')"``.
    """
    name = section["name"]
    cls = MODELS.get(name)
    if section.get("pretrained") and not hasattr(cls, "load_pretrained"):
        able = [repr(n) for n, c in sorted(MODELS.items()) if hasattr(c, "load_pretrained")]
        raise ValueError(f"model.pretrained: model {name!r} cannot load pretrained weights "
                         f"({'only ' + ', '.join(able) if able else 'no model'} can)")
    if getattr(cls, "takes_token_ids", False) and not token_ids:
        hint = " or ".join(repr(d) for d in text_datasets)
        raise ValueError(f"model.name = {name!r} reads token ids; dataset {data_name!r} is "
                         "not text" + (f" (use {hint})" if hint else ""))


def text_models() -> list[str]:
    """The registered models that read token ids (``takes_token_ids``)."""
    return sorted(n for n, c in MODELS.items() if getattr(c, "takes_token_ids", False))


def build_model(name: str, num_classes: int, options: Mapping[str, Any] | None = None) -> nn.Module:
    """The model ``name`` with ``num_classes`` outputs and its config fields.

    Args:
      name: a registered model (``MODELS``).
      num_classes: outputs of the classifier.
      options: its fields (``config.model`` less ``RUN_MODEL_FIELDS``); lists become
        tuples.

    Returns:
      The (unbound) Flax module.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    opts = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(options or {}).items()}
    return MODELS[name](num_classes=num_classes, **opts)


__all__ = ["CNN", "MLP", "MODELS", "RUN_MODEL_FIELDS", "ResNet18", "RobertaClassifier",
           "build_model", "check_model_config", "check_model_for_data", "model_fields",
           "register_model", "unregister_model"]
