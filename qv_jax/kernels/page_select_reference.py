"""jnp reference of the page-selection scoring kernels (LServe's query-aware page scores).

For a query ``q`` and a logical page whose keys have per-channel minimum ``kmin`` and maximum ``kmax``, the score

    sum_i max(q_i * kmax_i, q_i * kmin_i)    (i over the H channels)

bounds ``q . k`` from above for every key of the page. Since ``kmax >= kmin``, the larger product is ``q_i * kmax_i``
when ``q_i >= 0`` and ``q_i * kmin_i`` otherwise, so the score is two matrix products:
``max(q, 0) . kmax + min(q, 0) . kmin`` (what this reference computes, and the kernels with :func:`page_bound`
on the tiles they load).

Output: per KV head, the maximum over its ``G`` query heads, ``[B, K, logical_pages]`` float32, ``-inf`` on logical
pages that hold no visible token. Einsums and suffixes name logical pages ``L``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from qv_jax.kernels.flash import NT_DIMS, dot


def logical_page_scores(q, k_min, k_max, page_valid):
    """``q [B, K, G, H]``, ``k_min``/``k_max [B, K, L, H]``, ``page_valid [B, L]`` bool -> ``[B, K, L]``."""
    q = q.astype(jnp.float32)
    pos, neg = jnp.maximum(q, 0.0), jnp.minimum(q, 0.0)
    hi = lax.Precision.HIGHEST
    scores_BKGL = jnp.einsum("BKGH,BKLH->BKGL", pos, k_max.astype(jnp.float32), precision=hi) + jnp.einsum(
        "BKGH,BKLH->BKGL", neg, k_min.astype(jnp.float32), precision=hi
    )
    return jnp.where(page_valid[:, None], jnp.max(scores_BKGL, axis=2), -jnp.inf)


def page_bound(q_GH, k_min_LH, k_max_LH):
    """The bound for loaded tiles: ``q [G, H]`` against ``L`` logical pages' ``k_min``/``k_max [L, H]`` -> ``[G, L]``
    float32, as two products on the MXU / tensor cores."""
    q = q_GH.astype(jnp.float32)
    hi = lax.Precision.HIGHEST
    pos = dot(jnp.maximum(q, 0.0), k_max_LH.astype(jnp.float32), NT_DIMS, hi)
    return pos + dot(jnp.minimum(q, 0.0), k_min_LH.astype(jnp.float32), NT_DIMS, hi)
