"""The model, its caches and its inputs on a ``jax.sharding`` mesh: tensor parallel over ``"model"``, data
parallel over ``"data"`` (docs/sharding.md).

- :mod:`~qv_jax.sharding.mesh` — the two axes, :func:`make_mesh`, the context mesh of a sharded model's steps;
- :mod:`~qv_jax.sharding.heads` — the head rule (which model axes a model's heads allow);
- :mod:`~qv_jax.sharding.layout` — array layouts in the shape alphabet, the one spec parser, kernels per shard;
- :mod:`~qv_jax.sharding.transfer` — host arrays in and out of global arrays, bytes per device;
- :mod:`~qv_jax.sharding.plan` — :class:`ShardingPlan`: weights, batches and caches of one model on one mesh;
- :mod:`~qv_jax.sharding.checkpoint` — a checkpoint restored into its shards.
"""

from __future__ import annotations

from qv_jax._lazy import lazy_exports

EXPORTS = {
    "AXES": "qv_jax.sharding.mesh",
    "DATA_AXIS": "qv_jax.sharding.mesh",
    "MODEL_AXIS": "qv_jax.sharding.mesh",
    "check_mesh": "qv_jax.sharding.mesh",
    "context_mesh": "qv_jax.sharding.mesh",
    "make_mesh": "qv_jax.sharding.mesh",
    "kv_head_repeat": "qv_jax.sharding.heads",
    "valid_model_axes": "qv_jax.sharding.heads",
    "layout_spec": "qv_jax.sharding.layout",
    "per_shard": "qv_jax.sharding.layout",
    "bytes_per_device": "qv_jax.sharding.transfer",
    "put": "qv_jax.sharding.transfer",
    "to_host": "qv_jax.sharding.transfer",
    "ShardingPlan": "qv_jax.sharding.plan",
    "describe": "qv_jax.sharding.plan",
    "restore_checkpoint": "qv_jax.sharding.checkpoint",
}

__all__ = list(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
