"""The shared TFDS source of the TFDS datasets (CIFAR, ``fiarse_jax.data.cifar``; AG News,
``fiarse_jax.data.text``): every record of a split as host NumPy values.

Route: ``tfds.data_source`` (ArrayRecord random access), which reads prepared data
without TensorFlow. Preparing the data the first time (``download=True``) is
TFDS's ``download_and_prepare``, which needs internet (and, for CIFAR's image
encoding, TensorFlow on some TFDS versions: prepare once on a machine that has it,
e.g. Colab, then point ``data_dir`` at the result). Install with
``pip install -e ".[tfds]"``.

Absent data fails fast: without ``download`` a missing dataset is one clear error
naming ``data_dir``; with it, a 5-second connection check runs before TFDS starts a
download that would otherwise hang for minutes on an offline machine.

``mock_examples > 0`` reads ``tfds.testing.mock_data`` instead (random records of the
right shapes, no files): the smoke configs and the tests use it.

``SOURCE_OPTIONS``: the config.data fields of this source, checked by ``check_source_options``.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from fiarse_jax.data import checks
from fiarse_jax.utils import hub

#: config.data fields every TFDS dataset takes (where the data is, whether to fetch it).
SOURCE_OPTIONS = ("data_dir", "download", "mock_examples")


class DataUnavailable(RuntimeError):
    """The dataset is neither on disk nor downloadable; the message says how to provide it."""


def _import_tfds(what: str = "CIFAR", extra: str = "tfds"):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataUnavailable(
            f"{what} needs tensorflow-datasets: pip install -e \".[{extra}]\"") from None
    return tfds


_online = hub.reachable   # a module name of its own, so tests can stand in for the network


def default_data_dir() -> str:
    """TFDS's default data directory (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
    tfds = _import_tfds("TFDS data")
    return tfds.core.constants.get_default_data_dir()


def _ensure_prepared(tfds, name: str, tfds_name: str, host: str, data_dir: str | None,
                     download: bool) -> None:
    """Return if ``tfds_name`` is prepared; else download it, or fail fast saying how."""
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    if builder.is_prepared():
        return
    where = builder.data_dir
    if not download:
        raise DataUnavailable(
            f"{name} is not prepared under config.data.data_dir = {data_dir!r} "
            f"(looked in {where}). Set --config.data.download=True on a machine with "
            "internet, or copy a prepared TFDS directory there.")
    if not _online(host):
        raise DataUnavailable(
            f"{name} is not prepared under {where} and {host} cannot be reached "
            "(no internet?). Prepare it on a machine with internet "
            f"(tfds.builder('{tfds_name}', data_dir=...).download_and_prepare(file_format="
            "'array_record')) and point config.data.data_dir at it.")
    builder.download_and_prepare(file_format="array_record")


def _read_records(source) -> list[dict]:
    n = len(source)
    try:
        return list(source.__getitems__(list(range(n))))
    except Exception:  # noqa: BLE001 — some sources (mock data) lack batched reads
        return [source[i] for i in range(n)]


def read_tfds_splits(name: str, tfds_name: str, host: str, *, splits: Sequence[str],
                     data_dir: str | None = None, download: bool = False,
                     mock_examples: int = 0, extra: str = "tfds") -> list[list[dict]]:
    """Every record (a dict of NumPy values) of each split of ``tfds_name``, via
    ``tfds.data_source``; ``mock_examples > 0`` reads ``tfds.testing.mock_data``.

    ``name`` (the config's dataset name) and ``host`` (where the download comes from)
    go into the fail-fast messages; ``extra`` is the pip extra named when TFDS is missing.
    """
    tfds = _import_tfds(name, extra)
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    if mock_examples > 0:
        ctx = tfds.testing.mock_data(num_examples=int(mock_examples))
    else:
        ctx = contextlib.nullcontext()
        _ensure_prepared(tfds, name, tfds_name, host, data_dir, download)
    with ctx:
        return [_read_records(tfds.data_source(tfds_name, split=s, data_dir=data_dir,
                                               download=False))
                for s in splits]


def check_source_options(data) -> None:
    """config.data's ``mock_examples`` (an integer ≥ 0), ``download`` (a bool) and
    ``data_dir`` (a path or None), where present."""
    if "mock_examples" in data:
        checks.integer(data, "mock_examples", lo=0)
    if "download" in data and not isinstance(data["download"], bool):
        checks.fail("download", data["download"], "must be True or False")
    checks.data_dir(data)
