"""LServe's query-aware page selection for retrieval heads: score pages by their keys' bounds, pick the best.

Every logical page is scored by an upper bound of ``q . k`` from its keys' per-channel min / max (on the Pallas
kernels too); the best ``budget / page_size - 1`` older pages plus the newest are read, every page while the
context fits the budget, and a selection is reused for ``reselect_every`` steps or until a new page starts.
``length`` counts cache slots including the current token. See docs/attention.md, "Sparse decoding".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qv_jax.attention.backends import Backend
from qv_jax.attention.sharded import logical_page_scores

Array = jax.Array


def page_scores(
    q: Array,
    k_min: Array,
    k_max: Array,
    page_valid: Array,
    *,
    logical_pages_per_page: int,
    backend: str = Backend.REFERENCE,
    kernel: str | None = None,
) -> Array:
    """Physical-page scores ``[B, K, pages]`` float32 of ``q [B, K, G, H]`` (post-RoPE queries of a decode step).

    ``k_min`` / ``k_max [B, K, logical_pages, H]`` per logical page; ``page_valid [B, logical_pages]`` bool (a
    visible token in the logical page); ``logical_pages = pages * logical_pages_per_page``.
    """
    logical = logical_page_scores(q, k_min, k_max, page_valid, backend=backend, kernel=kernel)
    B, K, logical_pages = logical.shape
    pages = logical_pages // logical_pages_per_page
    return jnp.max(logical.reshape(B, K, pages, logical_pages_per_page), axis=-1)


def top_pages(scores: Array, newest_page: Array, num_older: int) -> Array:
    """The ``num_older`` best pages below ``newest_page``, ascending, ``[B, K, num_older]`` int32.

    Ties go to the lower page index. Needs ``newest_page > num_older`` (true whenever the context exceeds the
    budget), so only pages below the newest can be chosen.
    """
    candidates = jnp.arange(scores.shape[-1]) < newest_page
    _, idx = jax.lax.top_k(jnp.where(candidates, scores, -jnp.inf), num_older)
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def needs_selection(length: Array, selected_at: Array, *, token_budget: int, page_size: int, reselect_every: int):
    """Whether a step at ``length`` (slots including the current token) scores and selects pages anew.

    ``selected_at`` is the length at the last selection (``-1``: none since the last prefill).
    """
    newest = (length - 1) // page_size
    stale = (
        (selected_at < 0)
        | (length - selected_at >= reselect_every)
        | ((jnp.maximum(selected_at, 1) - 1) // page_size != newest)
    )
    return (length > token_budget) & stale


def visit_list(top: Array, length: Array, *, token_budget: int, page_size: int) -> tuple[Array, Array]:
    """Pages read at a step: ``(indices [B, K, budget / page_size], counts [B, K])``.

    Every page up to the newest while ``length <= token_budget``, otherwise the selected ``top`` pages plus the
    newest page.
    """
    B, K, num_older = top.shape
    newest = ((length - 1) // page_size).astype(jnp.int32)
    fits = length <= token_budget
    chosen = jnp.concatenate([top, jnp.broadcast_to(newest, (B, K, 1))], axis=-1)
    everything = jnp.broadcast_to(jnp.arange(num_older + 1, dtype=jnp.int32), chosen.shape)
    indices = jnp.where(fits, everything, chosen)
    counts = jnp.where(fits, newest + 1, num_older + 1)
    return indices, jnp.broadcast_to(counts, (B, K)).astype(jnp.int32)
