"""jnp reference of the page-selection scoring kernels (LServe's query-aware page scores).

For a query ``q`` and a logical page whose keys have per-channel minimum ``kmin`` and maximum ``kmax``, the score

    sum_d max(q_d * kmax_d, q_d * kmin_d)

bounds ``q . k`` from above for every key of the page. Since ``kmax >= kmin``, the larger product is ``q_d * kmax_d``
when ``q_d >= 0`` and ``q_d * kmin_d`` otherwise, so the score is two matrix products:
``max(q, 0) . kmax + min(q, 0) . kmin`` (what this reference and the kernels compute).

Output: per KV head, the maximum over its ``G`` query heads, ``[B, K, NL]`` float32, ``-inf`` on logical pages that
hold no visible token.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def logical_page_scores(q, k_min, k_max, page_valid):
    """``q [B, K, G, D]``, ``k_min``/``k_max [B, K, NL, D]``, ``page_valid [B, NL]`` bool -> ``[B, K, NL]``."""
    q = q.astype(jnp.float32)
    pos, neg = jnp.maximum(q, 0.0), jnp.minimum(q, 0.0)
    hi = lax.Precision.HIGHEST
    scores_BKGL = jnp.einsum("BKGD,BKLD->BKGL", pos, k_max.astype(jnp.float32), precision=hi) + jnp.einsum(
        "BKGD,BKLD->BKGL", neg, k_min.astype(jnp.float32), precision=hi
    )
    return jnp.where(page_valid[:, None], jnp.max(scores_BKGL, axis=2), -jnp.inf)
