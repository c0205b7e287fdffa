"""One run per workdir: a lock held while a run uses its workdir.

Two runs into one workdir overwrote each other silently (both exited 0, the files one's,
the TensorBoard events mixed), and a second run's start-up could break the first's next
checkpoint save. ``hold(workdir)`` takes an exclusive ``fcntl.flock`` on
``WORKDIR/.fiarse_lock`` before the run opens anything there, writes the holder (pid,
host, start time, command) into it, and keeps it until the run ends. A second run is
refused with one line naming the holder. The kernel releases the lock when its process
dies, so a lock left by a killed run is simply taken over.

Limits: a ``gs://`` (or other URL) workdir has no file lock — runs there are not guarded
(use one workdir per run); on a network filesystem ``flock`` is as good as its server's
locking. A multi-process run (``jax.process_count() > 1``: its workdir is shared, usually
``gs://``) is not locked either: a refusal on one process would leave the others waiting
in collectives. Without ``fcntl`` (Windows) nothing is locked.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator

import jax

from fiarse_jax.utils import paths
from fiarse_jax.utils.errors import ConfigError

try:
    import fcntl
except ImportError:   # Windows: no locking
    fcntl = None

LOCK_NAME = ".fiarse_lock"


class WorkdirBusy(ConfigError):
    """Another process holds the workdir's lock (a one-line ``ConfigError``)."""


def _holder(path: str) -> str:
    """Who holds the lock, as the holder wrote it (or 'another process')."""
    try:
        with open(path, encoding="utf-8") as f:
            h = json.loads(f.read() or "{}")
        return (f"process {h['pid']} on {h['host']} since {h['started']} "
                f"(`{h['command']}`)")
    except (OSError, ValueError, KeyError):
        return "another process"


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Hold ``workdir``'s lock for the block; ``ConfigError`` (one line naming the holder)
    when another process holds it. Creates ``workdir`` (local paths), and removes it again
    when the block wrote nothing there (a run stopped by a bad config leaves nothing)."""
    if fcntl is None or not paths.is_local(workdir) or jax.process_count() > 1:
        yield
        return
    created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise WorkdirBusy(f"--workdir {workdir!r} is in use by {_holder(path)}: wait for it "
                          "to finish or use another --workdir (its lock: "
                          f"{path})") from None
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        if created and os.listdir(workdir) == [LOCK_NAME]:   # a run that wrote nothing
            with contextlib.suppress(OSError):
                os.remove(path)
                os.rmdir(workdir)
