"""KV memory: the dense preallocated cache, and the paged and streaming pools of sparse decoding."""

from qv_jax.cache.dense import DenseCacheAttention, KVCache

__all__ = ["DenseCacheAttention", "KVCache"]
