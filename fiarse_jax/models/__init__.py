"""Models by name (``config.model.name``); each takes ``num_classes`` plus its own fields."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from fiarse_jax.models.cnn import CNN
from fiarse_jax.models.mlp import MLP
from fiarse_jax.models.resnet import ResNet18
from fiarse_jax.models.roberta import RobertaClassifier

MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN, "resnet18": ResNet18,
                                 "roberta": RobertaClassifier}


def build_model(name: str, num_classes: int, options: Mapping[str, Any] | None = None) -> nn.Module:
    """The model ``name`` with ``num_classes`` outputs and its config fields."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    opts = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(options or {}).items()}
    return MODELS[name](num_classes=num_classes, **opts)


__all__ = ["CNN", "MLP", "MODELS", "ResNet18", "RobertaClassifier", "build_model"]
