"""Every attention in qv-jax goes through this package.

``dot_product_attention`` is the dense jnp reference (the ``xla`` backend and the oracle for tests).
``sparse_attention`` runs one :class:`HeadPattern` per KV head (dense, streaming, strided, any block mask) on the
``xla`` reference or on the block-sparse Pallas kernels (``interpret`` on CPU, ``pallas`` on TPU / GPU); see
docs/attention.md.
"""

from qv_jax.attention.dense import attention_mask, dot_product_attention
from qv_jax.attention.patterns import BlockMask, HeadPattern, compile_block_tables, pattern_mask
from qv_jax.attention.sparse import block_tables, sparse_attention, visited_blocks

__all__ = [
    "BlockMask",
    "HeadPattern",
    "attention_mask",
    "block_tables",
    "compile_block_tables",
    "dot_product_attention",
    "pattern_mask",
    "sparse_attention",
    "visited_blocks",
]
