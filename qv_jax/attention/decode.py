"""Decode attention over paged KV pools, and merging attention results by their log-sum-exp.

``paged_decode_attention`` runs one query token per row against listed pages of a pool (the retrieval heads'
selected pages, or every page of a streaming head's sink + ring buffer) on the ``xla`` reference or the Pallas
kernels (``interpret`` on CPU, ``pallas`` on TPU / GPU), like ``sparse_attention`` does for prefill.
``merge_attention`` combines attentions over disjoint key sets into attention over their union.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qv_jax.attention.sharded import per_shard
from qv_jax.attention.sparse import kernel_impl
from qv_jax.kernels import paged_decode
from qv_jax.kernels.flash import merge_by_lse

Array = jax.Array


def paged_decode_attention(
    q: Array,
    k_pages: Array,
    v_pages: Array,
    token_valid: Array,
    page_indices: Array,
    page_counts: Array,
    *,
    backend: str = "xla",
    kernel: str | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
) -> tuple[Array, Array]:
    """Attention of ``q [B, K, G, D]`` (one token; the ``G`` query heads of each KV head) over listed pages.

    ``k_pages``/``v_pages [B, K, NP, P, D]``; ``token_valid [B, NP, P]`` bool marks visible tokens (shared by the
    heads); the first ``page_counts [B, K]`` entries of ``page_indices [B, K, N]`` are the distinct pages read.
    Returns ``out [B, K, G, D]`` in ``q.dtype`` and the log-sum-exp ``[B, K, G]`` float32. The Pallas kernels
    split the list (split-K) and merge the parts by log-sum-exp (see ``qv_jax.kernels.paged_decode``).
    """
    impl, interpret = kernel_impl(backend, kernel)
    run = functools.partial(
        paged_decode.paged_decode_attention, scale=scale, impl=impl, interpret=interpret, num_splits=num_splits
    )
    operands = (q, k_pages, v_pages, token_valid, page_indices, page_counts)
    if impl == "reference":
        return run(*operands)
    # on a sharded model each device runs the kernel on its own heads and rows (XLA cannot partition Pallas calls)
    return per_shard(
        run,
        *operands,
        in_layouts=("BHGD", "BHNPD", "BHNPD", "BNP", "BHN", "BH"),
        out_layouts=("BHGD", "BHG"),
    )


def merge_attention(*parts: tuple[Array, Array]) -> tuple[Array, Array]:
    """Attention over the union of disjoint key sets from ``(out, lse)`` pairs over each set.

    ``out`` and ``lse`` are any matching shapes ``[..., D]`` / ``[...]``; a part that saw nothing has ``lse = -inf``.
    """
    out, lse = merge_by_lse(jnp.stack([o for o, _ in parts]), jnp.stack([lse for _, lse in parts]), axis=0)
    return out.astype(parts[0][0].dtype), lse
