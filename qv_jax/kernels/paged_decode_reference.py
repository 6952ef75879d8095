"""jnp reference of the paged decode kernels: gather the listed pages, mask, softmax.

Takes the operands of ``kernels.paged_decode.paged_decode_attention`` unchanged and returns what it returns, so a
kernel and this reference can be compared directly. Memory is ``O(listed pages x page size)`` per KV head, the same
as the data the kernels read; it is the ``xla`` path of sparse decoding on CPU.
"""

from __future__ import annotations

import jax.numpy as jnp


def forward(q, k_pages, v_pages, token_valid, page_indices, page_counts, *, scale: float):
    """Attention of ``q [B, K, G, H]`` over the first ``page_counts [B, K]`` pages of ``page_indices [B, K, listed]``.

    ``k_pages``/``v_pages [B, K, pages, page_size, H]``; ``token_valid [B, pages, page_size]`` (shared by the heads)
    is True on tokens that may be seen. Returns ``out [B, K, G, H]`` in ``q.dtype`` and the log-sum-exp ``[B, K, G]``
    float32 (``-inf`` and a zero output where nothing is visible).
    """
    B, K, listed = page_indices.shape
    page_size = k_pages.shape[3]
    S = listed * page_size  # the gathered pages' tokens are the key slots
    idx = jnp.clip(page_indices, 0, k_pages.shape[2] - 1)  # [B, K, listed]
    k_listed = jnp.take_along_axis(k_pages, idx[:, :, :, None, None], axis=2)  # [B, K, listed, page_size, H]
    v_listed = jnp.take_along_axis(v_pages, idx[:, :, :, None, None], axis=2)
    valid_listed = jnp.take_along_axis(token_valid[:, None], idx[..., None], axis=2)  # [B, K, listed, page_size]
    in_list = jnp.arange(listed) < page_counts[..., None]  # [B, K, listed]
    keep_BKS = (valid_listed & in_list[..., None]).reshape(B, K, S)

    k_BKSH = k_listed.reshape(B, K, S, -1).astype(jnp.float32)
    v_BKSH = v_listed.reshape(B, K, S, -1).astype(jnp.float32)
    logits_BKGS = jnp.einsum("BKGH,BKSH->BKGS", q.astype(jnp.float32), k_BKSH) * scale
    logits_BKGS = jnp.where(keep_BKS[:, :, None], logits_BKGS, -jnp.inf)
    m_BKG = jnp.max(logits_BKGS, axis=-1)
    m_safe = jnp.where(jnp.isfinite(m_BKG), m_BKG, 0.0)
    p_BKGS = jnp.exp(logits_BKGS - m_safe[..., None])
    denom_BKG = jnp.sum(p_BKGS, axis=-1)
    seen = denom_BKG > 0
    l_safe = jnp.where(seen, denom_BKG, 1.0)
    out_BKGH = jnp.einsum("BKGS,BKSH->BKGH", p_BKGS, v_BKSH) / l_safe[..., None]
    lse_BKG = jnp.where(seen, m_safe + jnp.log(l_safe), -jnp.inf)
    return out_BKGH.astype(q.dtype), lse_BKG
