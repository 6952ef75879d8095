"""Host arrays in and out of (possibly multi-process) global arrays, and the bytes each device holds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def put(value, sharding: jax.sharding.Sharding, dtype=None) -> jax.Array:
    """A global array with ``sharding`` made from a host array that every process holds in full.

    Each device receives only its slice, read from ``value`` (a numpy array or a view of one, e.g. a memory map)
    and cast to ``dtype``; slices shared by several devices (replication) are read once.
    """
    host = value if isinstance(value, np.ndarray) else np.asarray(value)
    dtype = np.dtype(host.dtype if dtype is None else jnp.dtype(dtype))
    slices: dict[tuple, np.ndarray] = {}

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in slices:
            # always a copy: a device array must never alias a read-only memory map of a checkpoint
            slices[key] = np.array(host[index], dtype=dtype, order="C", copy=True)
        return slices[key]

    return jax.make_array_from_callback(host.shape, sharding, shard)


def to_host(x: jax.Array) -> np.ndarray:
    """A (global) array as one numpy array in this process; gathers across processes when needed."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def bytes_per_device(tree) -> dict[jax.Device, int]:
    """Bytes each (local) device holds of the arrays in ``tree``."""
    totals: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals
