"""KV memory (visual tokens -> KV memory): every cache and the attention handler that writes it.

- :mod:`~qv_jax.cache.dense` — :class:`KVCache`, preallocated slots for prefill and decoding;
- :mod:`~qv_jax.cache.layered` — :class:`LayeredKV`, QuickPrefill's pruned per-layer memory of a video;
- :mod:`~qv_jax.cache.sparse` — :class:`SparseKVCache`, the paged and streaming pools of sparse decoding.

Each cache declares its fields' layout on a device mesh (``qv_jax.sharding.layout``).
"""

from __future__ import annotations

from qv_jax._lazy import lazy_exports

EXPORTS = {
    "DenseCacheAttention": "qv_jax.cache.dense",
    "KVCache": "qv_jax.cache.dense",
    "AppendAttention": "qv_jax.cache.layered",
    "LayeredKV": "qv_jax.cache.layered",
    "SparseGeometry": "qv_jax.cache.sparse",
    "SparseKVCache": "qv_jax.cache.sparse",
    "sparse_kv_bytes": "qv_jax.cache.sparse",
}

__all__ = list(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
