"""Devices and processes: the 1-D ``clients`` mesh the ``sharded`` strategy splits
clients over, the replicated global model, and a process's local copy of it.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

CLIENT_AXIS = "clients"


def client_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``clients`` over ``devices``.

    Args:
      devices: the devices; default all of them, every process's.

    Returns:
      A ``Mesh`` with the one axis ``CLIENT_AXIS``.
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (CLIENT_AXIS,))


def put(tree, sharding: NamedSharding):
    """Place ``tree`` with ``sharding``; across processes every process holds the
    same full value (same seed, same data), and contributes its addressable slices."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(a):
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree_util.tree_map(put, tree)


def replicate(tree, mesh: Mesh | None = None):
    """``tree`` copied to every device of ``mesh`` (the global model for ``sharded``).

    Across processes every process must hold the same full value (same seed, same
    data); each contributes its addressable copies.

    Args:
      tree: a pytree of arrays.
      mesh: the mesh; default ``client_mesh()``.

    Returns:
      The pytree, replicated over ``mesh``.
    """
    return put(tree, NamedSharding(mesh or client_mesh(), P()))


def local_view(tree):
    """This process's copy of a replicated ``tree`` (itself when there is one process).

    Args:
      tree: a pytree of replicated arrays.

    Returns:
      The pytree with each leaf this process's first addressable shard.
    """
    if jax.process_count() == 1:
        return tree
    return jax.tree_util.tree_map(lambda a: a.addressable_data(0), tree)


def to_host(x) -> np.ndarray:
    """``x`` as a NumPy array on every process (an all-gather when it spans processes).

    Args:
      x: an array, possibly sharded across processes.

    Returns:
      The full value as a NumPy array.
    """
    if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
