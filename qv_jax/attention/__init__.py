"""Every attention in qv-jax goes through this package (docs/attention.md).

- :mod:`~qv_jax.attention.reference` — ``dot_product_attention``, the jnp oracle every other path is checked against;
- :mod:`~qv_jax.attention.patterns` / :mod:`~qv_jax.attention.tables` — what each KV head attends to
  (:class:`HeadPattern`), compiled into the block tables the kernels walk;
- :mod:`~qv_jax.attention.backends` — reference or Pallas kernel, compiled or interpreted;
- :mod:`~qv_jax.attention.local` — one device; :mod:`~qv_jax.attention.sharded` — the entry points, per shard on
  a mesh (``sparse_attention``, ``paged_decode_attention``);
- :mod:`~qv_jax.attention.sparsity`, :mod:`~qv_jax.attention.heads`, :mod:`~qv_jax.attention.page_selection` —
  sparse decoding: DuoAttention streaming heads and LServe page selection.
"""

from __future__ import annotations

from qv_jax._lazy import lazy_exports

EXPORTS = {
    "attention_mask": "qv_jax.attention.reference",
    "dot_product_attention": "qv_jax.attention.reference",
    "merge_attention": "qv_jax.attention.reference",
    "BlockMask": "qv_jax.attention.patterns",
    "HeadPattern": "qv_jax.attention.patterns",
    "pattern_mask": "qv_jax.attention.patterns",
    "block_tables": "qv_jax.attention.tables",
    "compile_block_tables": "qv_jax.attention.tables",
    "visited_blocks": "qv_jax.attention.tables",
    "Backend": "qv_jax.attention.backends",
    "Kernel": "qv_jax.attention.backends",
    "paged_decode_attention": "qv_jax.attention.sharded",
    "sharded_sparse_attention": "qv_jax.attention.sharded",
    "sparse_attention": "qv_jax.attention.sharded",
    "page_scores": "qv_jax.attention.page_selection",
    "top_pages": "qv_jax.attention.page_selection",
    "SparsityConfig": "qv_jax.attention.sparsity",
    "load_duo_attention_heads": "qv_jax.attention.heads",
    "reorder_heads": "qv_jax.attention.heads",
}

__all__ = list(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
