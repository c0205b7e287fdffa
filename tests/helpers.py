"""Test helpers: config overrides by dotted name, a minimal TensorBoard event reader,
parameter counts and leaves by path, a mocked Cloud Storage."""
import contextlib
import glob
import os
import struct

import jax
import numpy as np
from tensorboardX.proto import event_pb2


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]}, read record by record (TFRecord framing: u64 length,
    u32 crc, payload, u32 crc). As TensorBoard does, a SessionLog START event at step
    s discards what was logged earlier at steps ≥ s (tensorboardX's ``purge_step``)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            while header := f.read(12):
                (length,) = struct.unpack("<Q", header[:8])
                event = event_pb2.Event.FromString(f.read(length))
                f.read(4)
                if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                    out = {t: [(s, v) for s, v in rows if s < event.step] for t, rows in out.items()}
                for v in event.summary.value:
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def override(config, **fields):
    """Set ``config`` fields by dotted name (``**{"client.learning_rate": 0.05}``)."""
    for field, value in fields.items():
        node = config
        *parents, leaf = field.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def count(tree) -> int:
    """Number of scalars in a pytree (of arrays or ShapeDtypeStructs)."""
    return sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(tree))


def by_path(tree) -> dict:
    """{path tuple: leaf}, paths as plain key names (``masks.path_names``)."""
    from fiarse_jax.core import masks
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {masks.path_names(p): l for p, l in flat}


def random_units(groups, seed: int) -> dict:
    """A random 0/1 unit mask per group (about half kept, at least one unit each)."""
    rng = np.random.default_rng(seed)
    out = {}
    for g in groups:
        u = (rng.random(g.size) < 0.5).astype(np.float32)
        u[rng.integers(g.size)] = 1.0
        out[g.name] = u
    return out


def record_builds(monkeypatch) -> list:
    """Every ``Run`` that ``build.build_run`` returns from here on (``train``, ``export``),
    in order: a test reads the run a command built instead of building it again (a model
    init compile and the data each time)."""
    from fiarse_jax.experiment import build
    runs, real = [], build.build_run

    def spy(*args, **kwargs):
        runs.append(real(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(build, "build_run", spy)
    return runs


@contextlib.contextmanager
def mock_gcs(store: str, deny: str | None = None, bucket_check: bool = False):
    """``gs://X`` is ``store/X`` (no network), for ``etils.epath`` and for Orbax's two calls
    that bypass it (TensorStore's kvstore spec; the bucket's hierarchical-namespace check,
    which needs google-cloud-storage). Orbax then takes its Cloud Storage path (no renames;
    ``commit_success.txt`` marks a finished checkpoint), as on a real bucket. Every process
    that enters it with the same ``store`` sees one shared bucket (a pod's hosts).
    Paths under ``deny`` raise PermissionError (403); ``bucket_check``: leave Orbax's
    bucket check as it is."""
    import pytest
    from etils.epath import testing as epath_testing
    from orbax.checkpoint._src.path import gcs_utils

    def loc(p):
        p = os.fspath(p)
        if deny and p.startswith(deny):
            raise PermissionError(f"403 POST {p}: caller does not have storage.objects.create access")
        return os.path.join(store, p[len("gs://"):]) if p.startswith("gs://") else p

    def back(p):
        p = os.fspath(p)
        return "gs://" + os.path.relpath(p, store) if p.startswith(store + os.sep) else p

    def one(fn, p, *a, **k):
        return fn(loc(p), *a, **k)

    def two(fn, p, d, *a, **k):
        return fn(loc(p), loc(d), *a, **k)

    def open_(fn, p, mode="r", *a, **k):   # an object store: no directories to create first
        if any(c in mode for c in "wax"):
            os.makedirs(os.path.dirname(loc(p)), exist_ok=True)
        return fn(loc(p), mode, *a, **k)

    def glob(fn, p):
        return [back(x) for x in fn(loc(p))]

    def walk(fn, top, **k):
        for d, ds, fs in fn(loc(top), **k):
            yield back(d), ds, fs

    with pytest.MonkeyPatch.context() as mp, epath_testing.mock_epath(
            open=open_, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
            rmtree=one, stat=one, rename=two, replace=two, copy=two, glob=glob, walk=walk):
        mp.setattr(gcs_utils, "get_kvstore_for_gcs", lambda p: {"driver": "file", "path": loc(p)})
        if not bucket_check:
            mp.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda p: False)
        yield
