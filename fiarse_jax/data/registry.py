"""The datasets by name (``config.data.name``): ``DATASETS`` maps each to a ``DatasetSpec``
(its loader, the config.data fields it takes, its config check), and the functions that
check config.data and load the dataset it names.

Built in: ``digits`` (scikit-learn's, in the wheel), ``cifar10`` / ``cifar100`` (TFDS,
``fiarse_jax.data.cifar``), ``ag_news`` (token ids, ``fiarse_jax.data.text``), and two from
the user's own files (``fiarse_jax.data.files``), which need only ``data_dir``:

* ``image_folder``: ``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*`` PNG/JPEG
  images (torchvision's ImageFolder layout; classes sorted by name), decoded once and
  cached as uint8 arrays beside the data (or in ``~/.cache/fiarse_jax``).
* ``arrays``: ``data_dir`` is an .npz file with ``x_train``, ``y_train``, ``x_test``,
  ``y_test`` (x [n, H, W, C] or [n, H, W]; integer labels).

The image datasets other than digits take ``mean``, ``std`` (per channel) and ``augment``
(crop-pad-4 + flip); None picks the default: for 32×32 RGB images CIFAR-10's mean, the
authors' std (``augment.AUTHORS_CIFAR_STD``) and augmentation on, otherwise the training
split's own per-channel mean/std and no augmentation (``augment.image_transforms``).

A dataset of one's own is one line, e.g.
``register_dataset("mine", DatasetSpec(load_mine, ("data_dir",), check_mine))``.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

from fiarse_jax.data import checks
from fiarse_jax.data.augment import IMAGE_OPTIONS
from fiarse_jax.data.federation import PARTITIONS
from fiarse_jax.data.tfds import SOURCE_OPTIONS
from fiarse_jax.data.types import Dataset


class DatasetSpec(NamedTuple):
    """How a dataset is loaded from, and checked against, config.data.

    ``loader(**options) -> Dataset`` gets the fields of ``options`` that config.data holds.
    ``check(data)`` (or None) validates the config.data section before anything loads,
    raising ``ValueError("data.<field> = <value>: <what is allowed>")``. ``loader`` and
    ``check`` may be ``"module:function"`` strings, imported on first use, so that a
    dataset's optional dependencies load only when it is used.
    """

    loader: Callable[..., Dataset] | str
    options: tuple[str, ...] = ()
    check: Callable[[Any], None] | str | None = None
    description: str = ""
    token_ids: bool = False      # gives token ids (a text model's input), not images


_TEXT = ("tokenizer", "vocab_size", "max_length")

#: config.data.name -> its spec; the built-in loaders and checks are imported on first use.
DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("fiarse_jax.data.digits:load_digits",
                          description="scikit-learn's 1,797 8×8 handwritten digits"),
    "cifar10": DatasetSpec("fiarse_jax.data.cifar:load_cifar10", SOURCE_OPTIONS + IMAGE_OPTIONS,
                           "fiarse_jax.data.cifar:check_config", "CIFAR-10 via TFDS"),
    "cifar100": DatasetSpec("fiarse_jax.data.cifar:load_cifar100", SOURCE_OPTIONS + IMAGE_OPTIONS,
                            "fiarse_jax.data.cifar:check_config", "CIFAR-100 via TFDS"),
    "ag_news": DatasetSpec("fiarse_jax.data.text:load_ag_news", SOURCE_OPTIONS + _TEXT,
                           "fiarse_jax.data.text:check_config", "AG News as token ids, via TFDS",
                           token_ids=True),
    "image_folder": DatasetSpec("fiarse_jax.data.files:load_image_folder", ("data_dir",) + IMAGE_OPTIONS,
                                "fiarse_jax.data.files:check_image_folder", "an ImageFolder tree"),
    "arrays": DatasetSpec("fiarse_jax.data.files:load_arrays", ("data_dir",) + IMAGE_OPTIONS,
                          "fiarse_jax.data.files:check_arrays", "an .npz file of arrays"),
}


def _resolve(ref: Callable | str) -> Callable:
    """``ref`` itself, or the function a ``"module:function"`` string names."""
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def register_dataset(name: str, spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Add ``spec`` to ``DATASETS`` as ``name`` (an existing name only with ``replace``)."""
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"register_dataset({name!r}, ...): expected a DatasetSpec, got {spec!r}")
    if name in DATASETS and not replace:
        raise ValueError(f"dataset {name!r} is already registered; pass replace=True to replace it")
    spec = spec._replace(options=tuple(spec.options))
    DATASETS[name] = spec
    return spec


def load_dataset(name: str, **options) -> Dataset:
    """The dataset ``name``; ``options`` are passed to its loader (see ``DatasetSpec.options``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return _resolve(DATASETS[name].loader)(**options)


def load_from_config(data) -> Dataset:
    """The dataset config.data (``data``) names, with the options of its spec that ``data`` holds."""
    spec = DATASETS.get(data["name"])
    options = {k: data[k] for k in spec.options if k in data} if spec else {}
    return load_dataset(data["name"], **options)


def check_data_config(data) -> None:
    """Validate the config.data section ``data``: the dataset name, the partition fields,
    then the dataset's own check. Raises ``ValueError("data.<field> = <value>: ...")`` for
    the first bad field (``config.validate_config`` checks the generic federation fields:
    num_clients, alpha, test_fraction, min_client_size)."""
    if "name" not in data:
        raise ValueError("data.name is missing")
    name = checks.choice(data, "name", DATASETS)
    if "partition" in data:
        checks.choice(data, "partition", PARTITIONS)
    for field in ("n_train", "n_test", "classes_per_client"):
        if field in data:
            checks.integer(data, field)
    check = DATASETS[name].check
    if check is not None:
        _resolve(check)(data)
