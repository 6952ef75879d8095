"""Paged decode attention for GPU (Pallas, Triton backend): one query token per batch row over a list of KV pages.

Grid ``(batch, kv_head, split)``. A program holds the ``G`` query heads of one KV group as a ``[G, H]`` tile (``G``
padded to a power of two >= 16 by ``kernels.paged_decode``, as ``tl.dot`` wants) and walks its part of the page list
``pages_per_block`` pages at a time, gathering them from the batch row's pool (``k_ref[page_ids]``): a page is read
once per group, and only listed pages are read. Each split writes its own normalised output and log-sum-exp
(``kernels.paged_decode`` merges them). Token validity is an int32 ``[B, pages, page_size]`` array (>= 0: visible)
shared by the KV heads; list entries past the count are masked whole. See docs/attention.md, "Sparse decoding".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from qv_jax.kernels.compat import pl, triton_compiler_params
from qv_jax.kernels.flash import MASK_VALUE, NT_DIMS, dot, finish, precision_for, softmax_step


def _kernel(
    indices_ref,
    counts_ref,
    q_ref,
    k_ref,
    v_ref,
    valid_ref,
    o_ref,
    lse_ref,
    *,
    scale,
    pages_per_split,
    pages_per_block,
    precision,
):
    b, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    G, H = q_ref.shape
    page_size = k_ref.shape[1]
    tokens = pages_per_block * page_size
    q = q_ref[...]
    first = split * pages_per_split
    count = jnp.clip(counts_ref[b, head] - first, 0, pages_per_split)

    def visit(c, carry):
        m_prev, l_prev, acc = carry
        entry = first + c * pages_per_block
        page_ids = indices_ref[pl.ds(entry, pages_per_block)]
        k = k_ref[page_ids].reshape(tokens, H)
        v = v_ref[page_ids].reshape(tokens, H)
        in_list = (c * pages_per_block + jnp.arange(pages_per_block)) < count
        keep = ((valid_ref[page_ids] >= 0) & in_list[:, None]).reshape(1, tokens)
        logits = jnp.where(keep, dot(q, k, NT_DIMS, precision) * scale, MASK_VALUE)
        return softmax_step(logits, keep, v, m_prev, l_prev, acc, precision)

    init = (
        jnp.full((G,), MASK_VALUE, jnp.float32),
        jnp.zeros((G,), jnp.float32),
        jnp.zeros((G, H), jnp.float32),
    )
    m, denom, acc = lax.fori_loop(0, pl.cdiv(count, pages_per_block), visit, init)
    o_ref[...], lse_ref[...] = finish(acc, m, denom)


def forward(
    q, k_pages, v_pages, token_valid, page_indices, page_counts, *, scale, num_splits, pages_per_block, interpret
):
    """Per-split partial attention.

    ``q [B, K, G, H]`` (``G`` and ``H`` powers of two >= 16), ``k_pages``/``v_pages [B, K, pages, page_size, H]``,
    ``token_valid [B, pages, page_size]`` int32, ``page_indices [B, K, listed]`` int32 (``listed`` a multiple of
    ``num_splits * pages_per_block``, every entry a valid page), ``page_counts [B, K]`` int32. Returns
    ``out [B, K, num_splits, G, H]`` and ``lse [B, K, num_splits, G]``, float32.
    """
    B, K, G, H = q.shape
    pages, page_size = k_pages.shape[2:4]
    listed = page_indices.shape[2]
    pages_per_split = listed // num_splits
    kernel = functools.partial(
        _kernel,
        scale=scale,
        pages_per_split=pages_per_split,
        pages_per_block=pages_per_block,
        precision=precision_for(q.dtype),
    )
    pool = pl.BlockSpec((None, None, pages, page_size, H), lambda b, head, split: (b, head, 0, 0, 0))
    out, lse = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((B, K, num_splits, G, H), jnp.float32),
            jax.ShapeDtypeStruct((B, K, num_splits, G), jnp.float32),
        ],
        grid=(B, K, num_splits),
        in_specs=[
            pl.BlockSpec((None, None, listed), lambda b, head, split: (b, head, 0)),
            pl.BlockSpec(page_counts.shape, lambda b, head, split: (0, 0)),
            pl.BlockSpec((None, None, G, H), lambda b, head, split: (b, head, 0, 0)),
            pool,
            pool,
            pl.BlockSpec((None, pages, page_size), lambda b, head, split: (b, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, G, H), lambda b, head, split: (b, head, split, 0, 0)),
            pl.BlockSpec((None, None, None, G), lambda b, head, split: (b, head, split, 0)),
        ],
        compiler_params=triton_compiler_params(num_warps=4, num_stages=2),
        interpret=interpret,
        name="paged_decode_attention",
    )(page_indices, page_counts, q, k_pages, v_pages, token_valid)
    return out, lse
