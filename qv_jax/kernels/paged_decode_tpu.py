"""Paged decode attention for TPU (Mosaic): one query token per row over a list of KV pages, split-K.

Grid ``(batch, kv_head, split, step)``. The page list of each (row, KV head) is scalar-prefetched into SMEM and the
K / V block index maps read it, so each grid step DMAs one selected page (``[page_size, D]``) and the Pallas
pipeline fetches the next page while this one is computed. Entries past a list's count repeat its last page (the
block index does not change, so nothing is fetched) and skip the compute.

GQA: the ``G`` query heads of a KV group are one ``[G, D]`` block against each page, so a page is read once for the
whole group. Split-K: the list is cut into ``num_splits`` contiguous parts, each with its own output block and
running (max, sum) statistics; ``kernels.paged_decode`` merges the parts with their log-sum-exp. The split axis is
"parallel", so megacore chips (v4, v5p) can run splits on both TensorCores.

Per-row statistics are lane-replicated ``[G, 128]`` as in ``kernels.block_sparse_tpu``. Token validity comes as an
int32 ``[B, NP, 1, P]`` array (>= 0: visible), one ``[1, P]`` row per page, shared by the KV heads.
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
    b, h, s, i = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _init():
        m_scr[...] = jnp.full_like(m_scr, MASK_VALUE)
        l_scr[...] = jnp.zeros_like(l_scr)
        acc_scr[...] = jnp.zeros_like(acc_scr)

    @pl.when(s * pages_per_split + i < counts_ref[b, h])
    def _compute():
        keep = valid_ref[...] >= 0  # [1, P], broadcast over the query heads
        logits = jnp.where(keep, dot(q_ref[...], k_ref[...], NT_DIMS, precision) * scale, MASK_VALUE)
        m_scr[...], l_scr[...], acc_scr[...] = softmax_step_lanes(
            logits, keep, v_ref[...], m_scr[...], l_scr[...], acc_scr[...], precision
        )

    @pl.when(i == pages_per_split - 1)
    def _finish():
        o_ref[...], lse_ref[...] = finish_lanes(acc_scr[...], m_scr[...], l_scr[...])


def forward(q, k_pages, v_pages, token_valid, page_indices, page_counts, *, scale, num_splits, interpret):
    """Per-split partial attention.

    ``q [B, K, G, D]``, ``k_pages``/``v_pages [B, K, NP, P, D]``, ``token_valid [B, NP, 1, P]`` int32,
    ``page_indices [B, K, N]`` int32 with ``N`` a multiple of ``num_splits`` and every entry a valid page,
    ``page_counts [B, K]`` int32. Returns ``out [B, K, num_splits, G, D]`` float32 (normalised within its split)
    and ``lse [B, K, num_splits, G]`` float32.
    """
    B, K, G, D = q.shape
    P = k_pages.shape[3]
    N = page_indices.shape[2]
    pages_per_split = N // num_splits

    def q_map(b, h, s, i, *_):
        return b, h, 0, 0

    def page_map(b, h, s, i, indices_ref, _):
        return b, h, indices_ref[b, h, s * pages_per_split + i], 0, 0

    def valid_map(b, h, s, i, indices_ref, _):
        return b, indices_ref[b, h, s * pages_per_split + i], 0, 0

    def out_map(b, h, s, i, *_):
        return b, h, s, 0, 0

    kernel = functools.partial(_kernel, scale=scale, pages_per_split=pages_per_split, precision=precision_for(q.dtype))
    out, lse = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((B, K, num_splits, G, D), jnp.float32),
            jax.ShapeDtypeStruct((B, K, num_splits, G, LANES), jnp.float32),
        ],
        grid_spec=prefetch_scalar_grid_spec(
            num_scalar_prefetch=2,
            grid=(B, K, num_splits, pages_per_split),
            in_specs=[
                pl.BlockSpec((None, None, G, D), q_map),
                pl.BlockSpec((None, None, None, P, D), page_map),
                pl.BlockSpec((None, None, None, P, D), page_map),
                pl.BlockSpec((None, None, 1, P), valid_map),
            ],
            out_specs=[
                pl.BlockSpec((None, None, None, G, D), out_map),
                pl.BlockSpec((None, None, None, G, LANES), out_map),
            ],
            scratch_shapes=[
                tpu_vmem((G, LANES), jnp.float32),
                tpu_vmem((G, LANES), jnp.float32),
                tpu_vmem((G, D), jnp.float32),
            ],
        ),
        compiler_params=tpu_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=tpu_interpret_params() if interpret else False,
        name="paged_decode_attention",
    )(page_indices, page_counts, q, k_pages, v_pages, token_valid)
    return out, lse[..., 0]
