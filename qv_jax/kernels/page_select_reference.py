"""jnp reference of the page-selection scoring kernels (LServe's query-aware page scores).

For a query ``q`` and a logical page whose keys have per-channel minimum ``kmin`` and maximum ``kmax``, the score

    sum_d max(q_d * kmax_d, q_d * kmin_d)

bounds ``q . k`` from above for every key of the page. Since ``kmax >= kmin``, the larger product is ``q_d * kmax_d``
when ``q_d >= 0`` and ``q_d * kmin_d`` otherwise, so the score is two matrix products:
``max(q, 0) . kmax + min(q, 0) . kmin`` (what this reference computes, and the kernels with :func:`page_bound`
on the tiles they load).

Output: per KV head, the maximum over its ``G`` query heads, ``[B, K, NL]`` float32, ``-inf`` on logical pages that
hold no visible token.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from qv_jax.kernels.flash import NT_DIMS, dot


def logical_page_scores(q, k_min, k_max, page_valid):
    """``q [B, K, G, D]``, ``k_min``/``k_max [B, K, NL, D]``, ``page_valid [B, NL]`` bool -> ``[B, K, NL]``."""
    q = q.astype(jnp.float32)
    pos, neg = jnp.maximum(q, 0.0), jnp.minimum(q, 0.0)
    hi = lax.Precision.HIGHEST
    scores_BKGL = jnp.einsum("BKGD,BKLD->BKGL", pos, k_max.astype(jnp.float32), precision=hi) + jnp.einsum(
        "BKGD,BKLD->BKGL", neg, k_min.astype(jnp.float32), precision=hi
    )
    return jnp.where(page_valid[:, None], jnp.max(scores_BKGL, axis=2), -jnp.inf)


def page_bound(q_GD, k_min_LD, k_max_LD):
    """The bound for loaded tiles: ``q [G, D]`` against ``L`` logical pages' ``k_min``/``k_max [L, D]`` -> ``[G, L]``
    float32, as two products on the MXU / tensor cores."""
    q = q_GD.astype(jnp.float32)
    hi = lax.Precision.HIGHEST
    pos = dot(jnp.maximum(q, 0.0), k_max_LD.astype(jnp.float32), NT_DIMS, hi)
    return pos + dot(jnp.minimum(q, 0.0), k_min_LD.astype(jnp.float32), NT_DIMS, hi)
