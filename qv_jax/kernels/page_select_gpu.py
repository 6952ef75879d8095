"""Page-selection scores for GPU (Pallas, Triton backend): LServe's min/max bound of ``q . k`` per logical page.

Grid ``(batch, kv_head, page block)``: a program loads the key minima and maxima of ``block`` logical pages and
scores them against the KV group's query heads (``G`` padded to a power of two >= 16 for ``tl.dot``) as
``max(q, 0) kmax^T + min(q, 0) kmin^T``, keeps the maximum over the real query heads and masks pages with no
visible token. Page validity is an int32 ``[B, logical_pages]`` array (>= 0: visible), shared by the KV heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qv_jax.kernels.compat import pl, triton_compiler_params
from qv_jax.kernels.page_select_reference import page_bound


def _kernel(q_ref, k_min_ref, k_max_ref, valid_ref, o_ref, *, groups):
    scores = page_bound(q_ref[...], k_min_ref[...], k_max_ref[...])  # [Gp, block]
    rows = jnp.arange(scores.shape[0])[:, None]
    best = jnp.max(jnp.where(rows < groups, scores, -jnp.inf), axis=0)
    o_ref[...] = jnp.where(valid_ref[...] >= 0, best, -jnp.inf)


def forward(q, k_min, k_max, page_valid, *, groups: int, block: int, interpret: bool):
    """``q [B, K, Gp, H]`` (the first ``groups`` rows real; ``Gp``, ``H``, ``block`` powers of two >= 16),
    ``k_min``/``k_max [B, K, logical_pages, H]``, ``page_valid [B, logical_pages]`` int32. Returns
    ``[B, K, logical_pages]`` float32."""
    B, K, Gp, H = q.shape
    logical_pages = k_min.shape[2]
    stats = pl.BlockSpec((None, None, block, H), lambda b, head, j: (b, head, j, 0))
    return pl.pallas_call(
        functools.partial(_kernel, groups=groups),
        out_shape=jax.ShapeDtypeStruct((B, K, logical_pages), jnp.float32),
        grid=(B, K, logical_pages // block),
        in_specs=[
            pl.BlockSpec((None, None, Gp, H), lambda b, head, j: (b, head, 0, 0)),
            stats,
            stats,
            pl.BlockSpec((None, block), lambda b, head, j: (b, j)),
        ],
        out_specs=pl.BlockSpec((None, None, block), lambda b, head, j: (b, head, j)),
        compiler_params=triton_compiler_params(num_warps=4, num_stages=2),
        interpret=interpret,
        name="page_select_scores",
    )(q, k_min, k_max, page_valid)
