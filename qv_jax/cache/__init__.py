"""KV memory: the dense preallocated cache, and the paged and streaming pools of sparse decoding."""

from qv_jax.cache.dense import DenseCacheAttention, KVCache
from qv_jax.cache.sparse import SparseKVCache, sparse_kv_bytes

__all__ = ["DenseCacheAttention", "KVCache", "SparseKVCache", "sparse_kv_bytes"]
