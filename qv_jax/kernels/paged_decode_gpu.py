"""Paged decode attention for GPU (Pallas, Triton backend): one query token per row over a list of KV pages.

Grid ``(batch, kv_head, split)``. A program holds the ``G`` query heads of one KV group as a ``[G, D]`` tile (``G``
padded to a power of two >= 16 by ``kernels.paged_decode``, as ``tl.dot`` wants) and walks its part of the page
list ``pages_per_block`` pages at a time: the page indices are read from the list, the pages gathered from the
row's page pool (``k_ref[pages]``) and the tile computed with an online softmax. So a page is read once per group,
and only listed pages are read. Split-K: every program handles a contiguous part of the list and writes its own
normalised output and log-sum-exp; ``kernels.paged_decode`` merges them.

Token validity is an int32 ``[B, NP, P]`` array (>= 0: visible) shared by the KV heads; list entries past the
count are masked whole.
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
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    G, D = q_ref.shape
    P = k_ref.shape[1]
    tokens = pages_per_block * P
    q = q_ref[...]
    first = s * pages_per_split
    count = jnp.clip(counts_ref[b, h] - first, 0, pages_per_split)

    def visit(c, carry):
        m_prev, l_prev, acc = carry
        entry = first + c * pages_per_block
        pages = indices_ref[pl.ds(entry, pages_per_block)]
        k = k_ref[pages].reshape(tokens, D)
        v = v_ref[pages].reshape(tokens, D)
        listed = (c * pages_per_block + jnp.arange(pages_per_block)) < count
        keep = ((valid_ref[pages] >= 0) & listed[:, None]).reshape(1, tokens)
        logits = jnp.where(keep, dot(q, k, NT_DIMS, precision) * scale, MASK_VALUE)
        return softmax_step(logits, keep, v, m_prev, l_prev, acc, precision)

    init = (
        jnp.full((G,), MASK_VALUE, jnp.float32),
        jnp.zeros((G,), jnp.float32),
        jnp.zeros((G, D), jnp.float32),
    )
    m, denom, acc = lax.fori_loop(0, pl.cdiv(count, pages_per_block), visit, init)
    o_ref[...], lse_ref[...] = finish(acc, m, denom)


def forward(
    q, k_pages, v_pages, token_valid, page_indices, page_counts, *, scale, num_splits, pages_per_block, interpret
):
    """Per-split partial attention.

    ``q [B, K, G, D]`` (``G`` and ``D`` powers of two >= 16), ``k_pages``/``v_pages [B, K, NP, P, D]``,
    ``token_valid [B, NP, P]`` int32, ``page_indices [B, K, N]`` int32 (``N`` a multiple of
    ``num_splits * pages_per_block``, every entry a valid page), ``page_counts [B, K]`` int32. Returns
    ``out [B, K, num_splits, G, D]`` and ``lse [B, K, num_splits, G]``, float32.
    """
    B, K, G, D = q.shape
    NP, P = k_pages.shape[2:4]
    N = page_indices.shape[2]
    pages_per_split = N // num_splits
    kernel = functools.partial(
        _kernel,
        scale=scale,
        pages_per_split=pages_per_split,
        pages_per_block=pages_per_block,
        precision=precision_for(q.dtype),
    )
    pool = pl.BlockSpec((None, None, NP, P, D), lambda b, h, s: (b, h, 0, 0, 0))
    out, lse = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((B, K, num_splits, G, D), jnp.float32),
            jax.ShapeDtypeStruct((B, K, num_splits, G), jnp.float32),
        ],
        grid=(B, K, num_splits),
        in_specs=[
            pl.BlockSpec((None, None, N), lambda b, h, s: (b, h, 0)),
            pl.BlockSpec(page_counts.shape, lambda b, h, s: (0, 0)),
            pl.BlockSpec((None, None, G, D), lambda b, h, s: (b, h, 0, 0)),
            pool,
            pool,
            pl.BlockSpec((None, NP, P), lambda b, h, s: (b, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, G, D), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, G), lambda b, h, s: (b, h, s, 0)),
        ],
        compiler_params=triton_compiler_params(num_warps=4, num_stages=2),
        interpret=interpret,
        name="paged_decode_attention",
    )(page_indices, page_counts, q, k_pages, v_pages, token_valid)
    return out, lse
