"""Client reputation across rounds: attackers are persistent, so screening outcomes add up.

The record is an int32 array ``[num_clients, 2]``: per client, the rounds its update was
screened in and the rounds it was *flagged* in (rejected as non-finite, a norm outlier or
against the consensus direction; ``validation.REASONS`` 1–3). It lives in
``algorithm.ServerState`` and in every checkpoint, so a resumed run excludes exactly whom
the uninterrupted run would.

A client is excluded, from then on, once it has been flagged in at least ``min_flags``
rounds *and* in more than half the rounds it was screened in: one honest update caught
by chance (the screens reject a few percent of them) never excludes anyone, a persistent
attacker caught most of the time soon is. An excluded client is still sampled (the
schedule of the run does not change), but its update is refused unread (reason
``reputation``) and its record no longer changes. ``min_flags = 0`` turns exclusion off;
the record is kept either way.
"""
from __future__ import annotations

import numpy as np

from fiarse_jax.robust.validation import REASONS

#: ``validation.REASONS`` indices that flag a client.
FLAGGING = tuple(REASONS.index(r) for r in ("non_finite", "norm_outlier", "direction"))
NOT_SCREENED = REASONS.index("reputation")


def fresh(num_clients: int) -> np.ndarray:
    """An empty record: int32 [num_clients, 2] of (rounds screened, rounds flagged)."""
    return np.zeros((num_clients, 2), np.int32)


def excluded(record: np.ndarray, ids: np.ndarray, min_flags: int) -> np.ndarray:
    """bool [len(ids)]: which of the clients ``ids`` are excluded before this round.

    Args:
      record: int [num_clients, 2], (screened, flagged) per client.
      ids: the round's client ids.
      min_flags: flags needed for exclusion (0: nobody is excluded).
    """
    screened, flagged = record[ids, 0], record[ids, 1]
    return (min_flags > 0) & (flagged >= min_flags) & (2 * flagged > screened)


def update(record: np.ndarray, ids: np.ndarray, reason: np.ndarray) -> np.ndarray:
    """The record after a round: every client of ``ids`` that was screened (reason other
    than ``reputation``) counts one round screened, and one flagged when ``reason`` is in
    ``FLAGGING``. Returns a new array (the old one may sit in a pending checkpoint)."""
    reason = np.asarray(reason)
    screened = reason != NOT_SCREENED
    out = record.copy()
    np.add.at(out, (ids[screened], 0), 1)
    np.add.at(out, (ids[np.isin(reason, FLAGGING)], 1), 1)
    return out


def summary(record: np.ndarray, min_flags: int, attackers: np.ndarray) -> dict:
    """The summary's ``reputation`` entry: who is excluded at the end, and how many of
    them are simulated attackers."""
    everyone = np.arange(record.shape[0])
    out = excluded(record, everyone, min_flags)
    return {"min_flags": int(min_flags), "excluded": everyone[out].tolist(),
            "excluded_attackers": int((out & attackers).sum()),
            "excluded_honest": int((out & ~attackers).sum()),
            "flagged_attackers": int(record[attackers, 1].sum()),
            "flagged_honest": int(record[~attackers, 1].sum())}
