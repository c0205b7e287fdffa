"""Named random streams: every consumer of randomness in a run gets a key of its own.

A round's key is split into named streams first (``ROUND_STREAMS``), and only then is
a client id folded in, so no consumer's key can equal another's: the server's DP noise
is independent of every client's draws, an attack's noise of the data order, and so on.
Inside a client the key is split again (``CLIENT_STREAMS``): the policy's per-client draw
(Federated Dropout's units), the data order of each pass over the client's samples, and
the per-step keys (augmentation and the loss's own randomness).

Which clients train in a round is a NumPy draw of (seed, round) (``sample_clients``).

Evaluation uses one fixed key per run (``eval_key``): a random policy is scored with the
same sub-model draw at every evaluation, so accuracy curves are comparable.
"""
from __future__ import annotations

import jax
import numpy as np

#: The consumers of a round's key, in split order (the order is part of reproducibility).
ROUND_STREAMS = ("policy", "clients", "server", "attack")
#: The consumers of one client's key.
CLIENT_STREAMS = ("spec", "order", "steps")


def sample_clients(seed: int, round_index: int, num_clients: int, per_round: int) -> np.ndarray:
    """The round's clients, uniformly without replacement; a pure function of (seed, round)."""
    draw = np.random.default_rng([seed, round_index])
    return np.sort(draw.choice(num_clients, per_round, replace=False))


def round_streams(train_key: jax.Array, round_index: int) -> dict[str, jax.Array]:
    """``{stream: key}`` for round ``round_index`` (see ``ROUND_STREAMS``)."""
    keys = jax.random.split(jax.random.fold_in(train_key, round_index), len(ROUND_STREAMS))
    return dict(zip(ROUND_STREAMS, keys))


def client_keys(clients_key: jax.Array, ids) -> jax.Array:
    """One key per client id (a leading axis), from the round's ``clients`` stream."""
    return jax.vmap(jax.random.fold_in, (None, 0))(clients_key, ids)


def client_streams(client_key: jax.Array) -> dict[str, jax.Array]:
    """``{stream: key}`` inside one client (see ``CLIENT_STREAMS``)."""
    return dict(zip(CLIENT_STREAMS, jax.random.split(client_key, len(CLIENT_STREAMS))))


def eval_key(train_key: jax.Array) -> jax.Array:
    """The run's evaluation key: a stream of its own, the same at every evaluation."""
    return jax.random.fold_in(train_key, 2**32 - 1)   # no run reaches round 2^32 − 1
