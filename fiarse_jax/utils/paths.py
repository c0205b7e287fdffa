"""A run's files through ``etils.epath``: ``--workdir gs://bucket/run`` works as a local path.

Every file the project writes or reads in a workdir (metrics, rounds, summary, partition,
plots, TensorBoard events, exports; Orbax takes the same paths) goes through the helpers
here. A *local* path (no ``scheme://``; a mounted Drive or ``gcsfuse`` folder is local) is
read and written with the plain OS calls, exactly as before; a URL (``gs://``, ``s3://``)
goes through ``epath``, which needs its backend installed (``gcsfs``, or TensorFlow's
``tf.io.gfile`` as on Colab) and credentials for the bucket.

String paths stay strings: ``os.path.join`` is ``posixpath.join``, which keeps
``gs://bucket/run`` intact, so only the I/O goes through here. (``os.path.abspath`` does
not: it turns ``gs://b`` into ``$PWD/gs:/b``; use ``absolute``.)
"""
from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator

import jax
from etils import epath

from fiarse_jax.utils.errors import ConfigError


def as_path(path) -> epath.Path:
    """``path`` (a string, ``os.PathLike`` or ``epath.Path``) as an ``epath.Path``."""
    return epath.Path(path)


def is_local(path) -> bool:
    """Whether ``path`` is on this machine's file system (no ``scheme://`` URL)."""
    return "://" not in os.fspath(path)


def absolute(path) -> str:
    """``os.path.abspath`` for a local path; a URL as it is."""
    path = os.fspath(path)
    return os.path.abspath(path) if is_local(path) else path


def exists(path) -> bool:
    return os.path.exists(path) if is_local(path) else as_path(path).exists()


def isdir(path) -> bool:
    return os.path.isdir(path) if is_local(path) else as_path(path).is_dir()


def listdir(path) -> list[str]:
    """The names in directory ``path``."""
    return os.listdir(path) if is_local(path) else [p.name for p in as_path(path).iterdir()]


def makedirs(path) -> None:
    """Create directory ``path`` and its parents (no error if it exists). Nothing for a URL:
    an object store has no directories (a prefix exists once an object under it does),
    and ``gcsfs``'s makedirs would create a missing *bucket*, turning a mistyped bucket
    name into a new bucket instead of an error."""
    if is_local(path):
        os.makedirs(path, exist_ok=True)


def read_text(path) -> str:
    if is_local(path):
        with open(path) as f:
            return f.read()
    return as_path(path).read_text()


def read_bytes(path) -> bytes:
    if is_local(path):
        with open(path, "rb") as f:
            return f.read()
    return as_path(path).read_bytes()


def remove(path) -> None:
    if is_local(path):
        os.remove(path)
    else:
        as_path(path).unlink()


def remove_tree(path) -> None:
    """Remove a file or a directory tree (absent: nothing to do)."""
    if is_local(path):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        return
    p = as_path(path)
    if p.is_dir():
        p.rmtree()
    elif p.exists():
        p.unlink()


def write_atomic(path, data: str | bytes) -> None:
    """Write ``data`` (text or bytes) to ``path`` so that no reader ever sees it half-written.

    Locally: into ``path + ".tmp"``, then renamed over ``path`` (a rename is atomic).
    On an object store (``gs://``, ``s3://``), where a rename is a copy and a delete, the
    object is written directly: an object upload is itself all-or-nothing (Cloud Storage
    makes an object visible only once its upload completes, and then replaces the
    previous generation whole), so a reader sees the old content or the new, never a part.
    """
    mode = "wb" if isinstance(data, bytes) else "w"
    if is_local(path):
        tmp = os.fspath(path) + ".tmp"
        with open(tmp, mode) as f:
            f.write(data)
        os.replace(tmp, path)
    elif isinstance(data, bytes):
        as_path(path).write_bytes(data)
    else:
        as_path(path).write_text(data)


def save_figure(fig, path, **kwargs) -> None:
    """``fig.savefig(path, **kwargs)``; to a URL, rendered in memory and uploaded whole."""
    if is_local(path):
        fig.savefig(path, **kwargs)
        return
    buf = io.BytesIO()
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    fig.savefig(buf, format=fmt, **kwargs)
    write_atomic(path, buf.getvalue())


def upload_tree(local_dir: str, dest) -> None:
    """Copy every file under ``local_dir`` to the same relative path under ``dest``
    (each rewritten whole: ``write_atomic``)."""
    for root, _, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        target = dest if rel == "." else os.path.join(os.fspath(dest), rel)
        if files:
            makedirs(target)
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                write_atomic(os.path.join(os.fspath(target), name), f.read())


@contextlib.contextmanager
def local_dir_for(dest, prefix: str = "fiarse_jax_") -> Iterator[str]:
    """A local directory standing for ``dest``: ``dest`` itself when local; else a
    temporary directory whose files are uploaded to ``dest`` on exit (and then removed)."""
    if is_local(dest):
        yield os.fspath(dest)
        return
    tmp = tempfile.mkdtemp(prefix=prefix)
    try:
        yield tmp
        upload_tree(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_workdir(workdir) -> None:
    """Create ``workdir`` and write, read back and delete a small probe file there; raise
    ``ConfigError`` (one line naming the workdir and the reason) if any step fails, so a
    wrong bucket, a missing permission or unreachable storage stops a run before it starts.
    Local directories the probe had to create are removed again (a run that then stops on
    a bad config leaves nothing behind); the training loop creates the workdir for good."""
    workdir = os.fspath(workdir)
    probe = os.path.join(workdir, f".fiarse_probe_{os.getpid()}_{secrets.token_hex(4)}")
    created = []
    # Several processes probe one shared workdir: then none removes what it made.
    if is_local(workdir) and jax.process_count() == 1:
        d = os.path.abspath(workdir)
        while not os.path.exists(d) and os.path.dirname(d) != d:
            created.append(d)
            d = os.path.dirname(d)
    try:
        makedirs(workdir)
        write_atomic(probe, "ok\n")
        if read_text(probe) != "ok\n":
            raise OSError("a file written there reads back different")
        remove(probe)
    except Exception as e:  # noqa: BLE001 — any failure of the storage: one line
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise ConfigError(f"--workdir {workdir!r} is not writable ({reason})") from e
    finally:
        for d in created:   # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(d)
