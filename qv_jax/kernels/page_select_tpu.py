"""Page-selection scores for TPU (Mosaic): LServe's min/max bound of ``q . k`` per logical page.

Grid ``(batch, kv_head, page block)``. A step loads the per-channel key minima and maxima of ``block`` logical pages
(``[block, D]`` each) and scores them against the KV group's ``G`` query heads with two MXU products,
``max(q, 0) kmax^T + min(q, 0) kmin^T`` (``[G, block]``, logical pages on the lanes), takes the maximum over the
query heads (sublanes) and masks pages with no visible token. Reading the minima and maxima is the whole cost:
``2 / logical_page_size`` of the key cache.

Page validity is an int32 ``[B, 1, NL]`` row (>= 0: the page holds a visible token), shared by the KV heads.
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
    """``q [B, K, Gp, D]`` (the first ``groups`` rows real), ``k_min``/``k_max [B, K, NL, D]``,
    ``page_valid [B, 1, NL]`` int32; ``block`` divides ``NL``. Returns ``[B, K, 1, NL]`` float32."""
    B, K, Gp, D = q.shape
    NL = k_min.shape[2]
    stats = pl.BlockSpec((None, None, block, D), lambda b, h, j: (b, h, j, 0))
    return pl.pallas_call(
        functools.partial(_kernel, groups=groups),
        out_shape=jax.ShapeDtypeStruct((B, K, 1, NL), jnp.float32),
        grid=(B, K, NL // block),
        in_specs=[
            pl.BlockSpec((None, None, Gp, D), lambda b, h, j: (b, h, 0, 0)),
            stats,
            stats,
            pl.BlockSpec((None, 1, block), lambda b, h, j: (b, 0, j)),
        ],
        out_specs=pl.BlockSpec((None, None, 1, block), lambda b, h, j: (b, h, 0, j)),
        compiler_params=tpu_compiler_params(("parallel", "parallel", "parallel")),
        interpret=tpu_interpret_params() if interpret else False,
        name="page_select_scores",
    )(q, k_min, k_max, page_valid)
