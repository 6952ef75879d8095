"""Every attention in qv-jax goes through this package.

``dot_product_attention`` is the dense jnp reference (the ``xla`` backend and the oracle for tests).
``sparse_attention`` runs one :class:`HeadPattern` per KV head (dense, streaming, strided, any block mask) on the
``xla`` reference or on the block-sparse Pallas kernels (``interpret`` on CPU, ``pallas`` on TPU / GPU); see
docs/attention.md. Sparse decoding: :class:`SparsityConfig` (DuoAttention streaming heads, LServe page selection),
``paged_decode_attention`` over KV pages and the page-selection rule in ``qv_jax.attention.page_selection``.
On a device mesh, ``sharded_sparse_attention`` runs the kernels per shard (``qv_jax.attention.sharded``).
"""

from qv_jax.attention.decode import merge_attention, paged_decode_attention
from qv_jax.attention.dense import attention_mask, dot_product_attention
from qv_jax.attention.page_selection import page_scores, top_pages
from qv_jax.attention.patterns import BlockMask, HeadPattern, compile_block_tables, pattern_mask
from qv_jax.attention.sharded import sharded_sparse_attention
from qv_jax.attention.sparse import block_tables, sparse_attention, visited_blocks
from qv_jax.attention.sparsity import SparsityConfig, load_duo_attention_heads, reorder_heads

__all__ = [
    "BlockMask",
    "HeadPattern",
    "SparsityConfig",
    "attention_mask",
    "block_tables",
    "compile_block_tables",
    "dot_product_attention",
    "load_duo_attention_heads",
    "merge_attention",
    "page_scores",
    "paged_decode_attention",
    "pattern_mask",
    "reorder_heads",
    "sharded_sparse_attention",
    "sparse_attention",
    "top_pages",
    "visited_blocks",
]
