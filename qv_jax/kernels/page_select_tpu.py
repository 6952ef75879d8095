"""Page-selection scores for TPU (Mosaic): LServe's min/max bound of ``q . k`` per logical page.

Grid ``(batch, kv_head, page block)``. A step loads the per-channel key minima and maxima of ``block`` logical pages
(``[block, H]`` each) and scores them against the KV group's ``G`` query heads with two MXU products,
``max(q, 0) kmax^T + min(q, 0) kmin^T`` (``[G, block]``, logical pages on the lanes), takes the maximum over the
query heads (sublanes) and masks pages with no visible token. Reading the minima and maxima is the whole cost:
``2 / logical_page_size`` of the key cache.

Page validity is an int32 ``[B, 1, logical_pages]`` row (>= 0: the page holds a visible token), shared by the KV heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from qv_jax.kernels.compat import pl, tpu_compiler_params, tpu_interpret_params
from qv_jax.kernels.page_select_reference import page_bound


def _kernel(q_ref, k_min_ref, k_max_ref, valid_ref, o_ref, *, groups):
    scores = page_bound(q_ref[...], k_min_ref[...], k_max_ref[...])  # [Gp, block]
    rows = lax.broadcasted_iota(jnp.int32, scores.shape, 0)
    best = jnp.max(jnp.where(rows < groups, scores, -jnp.inf), axis=0, keepdims=True)
    o_ref[...] = jnp.where(valid_ref[...] >= 0, best, -jnp.inf)


def forward(q, k_min, k_max, page_valid, *, groups: int, block: int, interpret: bool):
    """``q [B, K, Gp, H]`` (the first ``groups`` rows real), ``k_min``/``k_max [B, K, logical_pages, H]``,
    ``page_valid [B, 1, logical_pages]`` int32; ``block`` divides ``logical_pages``. Returns
    ``[B, K, 1, logical_pages]`` float32."""
    B, K, Gp, H = q.shape
    logical_pages = k_min.shape[2]
    stats = pl.BlockSpec((None, None, block, H), lambda b, head, j: (b, head, j, 0))
    return pl.pallas_call(
        functools.partial(_kernel, groups=groups),
        out_shape=jax.ShapeDtypeStruct((B, K, 1, logical_pages), jnp.float32),
        grid=(B, K, logical_pages // block),
        in_specs=[
            pl.BlockSpec((None, None, Gp, H), lambda b, head, j: (b, head, 0, 0)),
            stats,
            stats,
            pl.BlockSpec((None, 1, block), lambda b, head, j: (b, 0, j)),
        ],
        out_specs=pl.BlockSpec((None, None, 1, block), lambda b, head, j: (b, head, 0, j)),
        compiler_params=tpu_compiler_params(("parallel", "parallel", "parallel")),
        interpret=tpu_interpret_params() if interpret else False,
        name="page_select_scores",
    )(q, k_min, k_max, page_valid)
