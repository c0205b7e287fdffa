"""Where a run's numbers go: JSON lines for scripts, TensorBoard for people.

* ``WORKDIR/metrics.jsonl``: one object per evaluation (``round``,
  ``global_accuracy``, ``local_accuracy`` {capacity: acc}, ...; see ``evaluate``).
* ``WORKDIR/rounds.jsonl``: one object per round: ``round``, ``train_loss`` (mean
  client loss), ``update_norm_mean`` / ``update_norm_max`` (L2 norm of the accepted
  client deltas), ``rejected`` / ``rejected_<reason>`` / ``flagged``, ``round_time_s``,
  and with an attack, reputation or DP their counts and ε (``algorithm.round_row``).
* ``WORKDIR/tensorboard/``: the same scalars as TensorBoard events (tensorboardX).

A resumed run passes the checkpoint's rows: both JSON files are rewritten from them
and TensorBoard's earlier events are superseded by them, so no round appears twice
or goes missing.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

from fiarse_jax.utils import paths
from fiarse_jax.utils.paths import write_atomic

__all__ = ["MetricWriter", "NullWriter", "read_jsonl", "scalars", "write_atomic"]


def _rows(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file ([] if it does not exist). A last line without its
    newline (a running run caught mid-write, e.g. by ``fiarse-jax plot``) is left out."""
    if not paths.exists(path):
        return []
    text = paths.read_text(path)
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines = lines[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def scalars(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten a metrics row to TensorBoard tags (``local_accuracy/1/4``)."""
    out = {}
    for k, v in row.items():
        if k == "round":
            continue
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


class NullWriter:
    """``MetricWriter``'s interface, writing nothing (processes other than 0)."""

    def write_round(self, row: dict) -> None:
        del row

    def write_eval(self, row: dict) -> None:
        del row

    def close(self) -> None:
        pass


class MetricWriter:
    """Writes evaluation rows and per-round rows to JSON lines and TensorBoard.

    In a local workdir the JSON-lines files are appended to and the events written in
    place. In a remote one (``gs://...``: objects cannot be appended to) each JSON-lines
    file is rewritten whole after every row, and the events are written to a local
    temporary directory that is uploaded to ``workdir/tensorboard/`` after every
    evaluation and at ``close``.
    """

    def __init__(self, workdir: str, *, evals: Sequence[dict] = (), rounds: Sequence[dict] = (),
                 tensorboard: bool = True):
        self.eval_path = os.path.join(workdir, "metrics.jsonl")
        self.round_path = os.path.join(workdir, "rounds.jsonl")
        write_atomic(self.eval_path, _rows(evals))
        write_atomic(self.round_path, _rows(rounds))
        self._local = paths.is_local(workdir)
        if self._local:
            self._eval, self._round = open(self.eval_path, "a"), open(self.round_path, "a")
        else:   # the rows so far, each file rewritten whole
            self._eval, self._round = _Rewritten(self.eval_path, evals), _Rewritten(self.round_path, rounds)
        self._tb = None
        self._tb_dest = os.path.join(workdir, "tensorboard")
        self._tb_cache = None
        if tensorboard:
            # purge_step=1 makes TensorBoard discard every earlier event in this
            # directory (a killed run may have logged rounds past its checkpoint, or lost
            # unflushed ones; a restart from round 0 replaces an old run); the
            # checkpoint's rows are then logged again, so the events match the JSON files.
            # Remotely the new events file lands beside the old ones at the first upload,
            # so the same rule applies.
            from tensorboardX import SummaryWriter  # lazily: its import takes seconds
            if not self._local:
                self._tb_cache = tempfile.mkdtemp(prefix="fiarse_jax_tb_")
            self._tb = SummaryWriter(self._tb_cache or self._tb_dest, flush_secs=10, purge_step=1)
            for row in rounds:
                self._scalars(row)
            for row in evals:
                self._scalars(row, self.EVAL_SKIP)
            self._upload_events()

    #: train_loss already goes to TensorBoard with the round row; wall time is no metric.
    EVAL_SKIP = ("train_loss", "elapsed_s")

    def _scalars(self, row: dict, skip=()) -> None:
        if self._tb is not None:
            for tag, value in scalars(row).items():
                if tag not in skip:
                    self._tb.add_scalar(tag, value, global_step=row["round"])

    def _upload_events(self) -> None:
        """Remote workdir: flush the events and copy them to ``workdir/tensorboard/``."""
        if self._tb_cache is not None:
            self._tb.flush()
            paths.upload_tree(self._tb_cache, self._tb_dest)

    def _emit(self, handle, row: dict, skip=()) -> None:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        self._scalars(row, skip)

    def write_round(self, row: dict) -> None:
        self._emit(self._round, row)

    def write_eval(self, row: dict) -> None:
        self._emit(self._eval, row, self.EVAL_SKIP)
        self._upload_events()

    def close(self) -> None:
        self._eval.close()
        self._round.close()
        if self._tb is not None:
            self._tb.close()
            if self._tb_cache is not None:
                try:
                    paths.upload_tree(self._tb_cache, self._tb_dest)
                finally:
                    shutil.rmtree(self._tb_cache, ignore_errors=True)


class _Rewritten:
    """A JSON-lines "append handle" for object stores: ``flush`` rewrites the whole file."""

    def __init__(self, path: str, rows: Sequence[dict]):
        self.path, self._text = path, _rows(rows)

    def write(self, line: str) -> None:
        self._text += line

    def flush(self) -> None:
        write_atomic(self.path, self._text)

    def close(self) -> None:
        pass
