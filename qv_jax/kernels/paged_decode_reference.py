"""jnp reference of the paged decode kernels: gather the listed pages, mask, softmax.

Takes the operands of ``kernels.paged_decode.paged_decode_attention`` unchanged and returns what it returns, so a
kernel and this reference can be compared directly. Memory is ``O(listed pages x page size)`` per KV head, the same
as the data the kernels read; it is the ``xla`` path of sparse decoding on CPU.
"""

from __future__ import annotations

import jax.numpy as jnp


def forward(q, k_pages, v_pages, token_valid, page_indices, page_counts, *, scale: float):
    """Attention of ``q [B, K, G, D]`` over the first ``page_counts [B, K]`` pages of ``page_indices [B, K, N]``.

    ``k_pages``/``v_pages [B, K, NP, P, D]``; ``token_valid [B, NP, P]`` (shared by the heads) is True on tokens
    that may be seen. Returns ``out [B, K, G, D]`` in ``q.dtype`` and the log-sum-exp ``[B, K, G]`` float32
    (``-inf`` and a zero output where nothing is visible).
    """
    B, K, N = page_indices.shape
    P = k_pages.shape[3]
    idx_BKN = jnp.clip(page_indices, 0, k_pages.shape[2] - 1)
    k_BKNPD = jnp.take_along_axis(k_pages, idx_BKN[:, :, :, None, None], axis=2)
    v_BKNPD = jnp.take_along_axis(v_pages, idx_BKN[:, :, :, None, None], axis=2)
    valid_BKNP = jnp.take_along_axis(token_valid[:, None], idx_BKN[..., None], axis=2)
    listed_BKN = jnp.arange(N) < page_counts[..., None]
    keep_BKS = (valid_BKNP & listed_BKN[..., None]).reshape(B, K, N * P)

    k_BKSD = k_BKNPD.reshape(B, K, N * P, -1).astype(jnp.float32)
    v_BKSD = v_BKNPD.reshape(B, K, N * P, -1).astype(jnp.float32)
    logits_BKGS = jnp.einsum("BKGD,BKSD->BKGS", q.astype(jnp.float32), k_BKSD) * scale
    logits_BKGS = jnp.where(keep_BKS[:, :, None], logits_BKGS, -jnp.inf)
    m_BKG = jnp.max(logits_BKGS, axis=-1)
    m_safe = jnp.where(jnp.isfinite(m_BKG), m_BKG, 0.0)
    p_BKGS = jnp.exp(logits_BKGS - m_safe[..., None])
    denom_BKG = jnp.sum(p_BKGS, axis=-1)
    seen = denom_BKG > 0
    l_safe = jnp.where(seen, denom_BKG, 1.0)
    out_BKGD = jnp.einsum("BKGS,BKSD->BKGD", p_BKGS, v_BKSD) / l_safe[..., None]
    lse_BKG = jnp.where(seen, m_safe + jnp.log(l_safe), -jnp.inf)
    return out_BKGD.astype(q.dtype), lse_BKG
