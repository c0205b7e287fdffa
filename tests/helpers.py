"""Test helpers: config overrides by dotted name, a minimal TensorBoard event reader,
parameter counts and leaves by path."""
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
    from fiarse_jax import masks
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
    from fiarse_jax import build
    runs, real = [], build.build_run

    def spy(*args, **kwargs):
        runs.append(real(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(build, "build_run", spy)
    return runs
