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
import numpy as np
from jax import lax

from qv_jax.kernels.compat import pl, prefetch_scalar_grid_spec, tpu_compiler_params, tpu_interpret_params, tpu_vmem

LANES = 128
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
NN_DIMS = (((1,), (0,)), ((), ()))  # a @ b


def _lanes(x, n: int):
    """Widen a lane-replicated ``[r, 128]`` array to ``[r, n]``."""
    if n % LANES == 0:
        return x if n == LANES else jnp.tile(x, (1, n // LANES))
    return x[:, :n]


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


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
    page_size = k_ref.shape[0]
    d = acc_scr.shape[-1]

    @pl.when(i == 0)
    def _init():
        m_scr[...] = jnp.full_like(m_scr, MASK_VALUE)
        l_scr[...] = jnp.zeros_like(l_scr)
        acc_scr[...] = jnp.zeros_like(acc_scr)

    @pl.when(s * pages_per_split + i < counts_ref[b, h])
    def _compute():
        k = k_ref[...]
        v = v_ref[...]
        keep = valid_ref[...] >= 0  # [1, P], broadcast over the query heads
        logits = lax.dot_general(q_ref[...], k, NT_DIMS, preferred_element_type=jnp.float32, precision=precision)
        logits = jnp.where(keep, logits * scale, MASK_VALUE)
        m_prev = m_scr[...]
        m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
        p = jnp.where(keep, jnp.exp(logits - _lanes(m_next, page_size)), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_next
        pv = lax.dot_general(p.astype(v.dtype), v, NN_DIMS, preferred_element_type=jnp.float32, precision=precision)
        acc_scr[...] = _lanes(alpha, d) * acc_scr[...] + pv

    @pl.when(i == pages_per_split - 1)
    def _finish():
        denom = l_scr[...]
        seen = denom > 0.0
        safe = jnp.where(seen, denom, 1.0)
        o_ref[...] = jnp.where(_lanes(seen, d), acc_scr[...] / _lanes(safe, d), 0.0)
        lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(safe), -jnp.inf)


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

    kernel = functools.partial(_kernel, scale=scale, pages_per_split=pages_per_split, precision=_precision(q.dtype))
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
