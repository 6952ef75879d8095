"""Paged decode attention for TPU (Mosaic): one query token per batch row over a list of KV pages, split-K.

Grid ``(batch, kv_head, split, step)``: the page lists are scalar-prefetched into SMEM and read by the K / V index
maps, so a step DMAs one listed page (``[page_size, H]``) while the pipeline fetches the next; entries past a list's
count repeat its last page (nothing fetched) and skip the compute. The ``G`` query heads of a KV group are one
``[G, H]`` block (statistics lane-replicated ``[G, 128]``), so a page is read once per group. Splits run "parallel"
(both TensorCores of a v4 / v5p megacore). Token validity: int32 ``[B, pages, 1, page_size]``, >= 0 visible.
See docs/attention.md, "Sparse decoding".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qv_jax.kernels.compat import pl, prefetch_scalar_grid_spec, tpu_compiler_params, tpu_interpret_params, tpu_vmem
from qv_jax.kernels.flash import LANES, MASK_VALUE, NT_DIMS, dot, finish_lanes, precision_for, softmax_step_lanes


def _kernel(
    indices_ref,
    counts_ref,
    q_ref,
    k_ref,
    v_ref,
    valid_ref,
    o_ref,
    lse_ref,
    m_scr,
    l_scr,
    acc_scr,
    *,
    scale,
    pages_per_split,
    precision,
):
    b, head, split, i = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _init():
        m_scr[...] = jnp.full_like(m_scr, MASK_VALUE)
        l_scr[...] = jnp.zeros_like(l_scr)
        acc_scr[...] = jnp.zeros_like(acc_scr)

    @pl.when(split * pages_per_split + i < counts_ref[b, head])
    def _compute():
        keep = valid_ref[...] >= 0  # [1, page_size], broadcast over the query heads
        logits = jnp.where(keep, dot(q_ref[...], k_ref[...], NT_DIMS, precision) * scale, MASK_VALUE)
        m_scr[...], l_scr[...], acc_scr[...] = softmax_step_lanes(
            logits, keep, v_ref[...], m_scr[...], l_scr[...], acc_scr[...], precision
        )

    @pl.when(i == pages_per_split - 1)
    def _finish():
        o_ref[...], lse_ref[...] = finish_lanes(acc_scr[...], m_scr[...], l_scr[...])


def forward(q, k_pages, v_pages, token_valid, page_indices, page_counts, *, scale, num_splits, interpret):
    """Per-split partial attention.

    ``q [B, K, G, H]``, ``k_pages``/``v_pages [B, K, pages, page_size, H]``,
    ``token_valid [B, pages, 1, page_size]`` int32, ``page_indices [B, K, listed]`` int32 with ``listed`` a multiple
    of ``num_splits`` and every entry a valid page, ``page_counts [B, K]`` int32. Returns
    ``out [B, K, num_splits, G, H]`` float32 (normalised within its split) and ``lse [B, K, num_splits, G]`` float32.
    """
    B, K, G, H = q.shape
    page_size = k_pages.shape[3]
    listed = page_indices.shape[2]
    pages_per_split = listed // num_splits

    def q_map(b, head, split, i, *_):
        return b, head, 0, 0

    def page_map(b, head, split, i, indices_ref, _):
        return b, head, indices_ref[b, head, split * pages_per_split + i], 0, 0

    def valid_map(b, head, split, i, indices_ref, _):
        return b, indices_ref[b, head, split * pages_per_split + i], 0, 0

    def out_map(b, head, split, i, *_):
        return b, head, split, 0, 0

    kernel = functools.partial(_kernel, scale=scale, pages_per_split=pages_per_split, precision=precision_for(q.dtype))
    out, lse = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((B, K, num_splits, G, H), jnp.float32),
            jax.ShapeDtypeStruct((B, K, num_splits, G, LANES), jnp.float32),
        ],
        grid_spec=prefetch_scalar_grid_spec(
            num_scalar_prefetch=2,
            grid=(B, K, num_splits, pages_per_split),
            in_specs=[
                pl.BlockSpec((None, None, G, H), q_map),
                pl.BlockSpec((None, None, None, page_size, H), page_map),
                pl.BlockSpec((None, None, None, page_size, H), page_map),
                pl.BlockSpec((None, None, 1, page_size), valid_map),
            ],
            out_specs=[
                pl.BlockSpec((None, None, None, G, H), out_map),
                pl.BlockSpec((None, None, None, G, LANES), out_map),
            ],
            scratch_shapes=[
                tpu_vmem((G, LANES), jnp.float32),
                tpu_vmem((G, LANES), jnp.float32),
                tpu_vmem((G, H), jnp.float32),
            ],
        ),
        compiler_params=tpu_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=tpu_interpret_params() if interpret else False,
        name="paged_decode_attention",
    )(page_indices, page_counts, q, k_pages, v_pages, token_valid)
    return out, lse[..., 0]
