"""jnp reference of the block-sparse kernels: the same ``BlockTables`` expanded to a dense mask.

It takes and returns exactly what ``block_sparse_tpu.forward`` / ``block_sparse_gpu.forward`` do (padded operands
``q [B, K, G, Tp, Hp]``, ``k``/``v [B, K, Sp, Hp]``; log-sum-exp ``[B, K, G, Tp]``), so a kernel and its reference
can be compared tile for tile. Memory is ``O(T x S)``: for tests and small shapes.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from qv_jax.kernels.block_tables import BlockTables


@functools.lru_cache(maxsize=32)
def _padded_mask(tables: BlockTables) -> np.ndarray:
    """``[rows, Tp, Sp]`` bool: the tables' element mask, padding rows and columns masked out."""
    mask = tables.element_mask()
    rows = mask.shape[0]
    out = np.zeros((rows, tables.num_q_blocks * tables.block_q, tables.num_kv_blocks * tables.block_kv), bool)
    out[:, : tables.q_len, : tables.kv_len] = mask
    return out


def _allowed(tables: BlockTables, segments):
    allowed = jnp.asarray(_padded_mask(tables))[None, :, None]  # [1, rows, 1, Tp, Sp]
    if segments is not None:
        q_seg, kv_seg = segments["q"], segments["kv"]
        same = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg >= 0)[:, None, :]
        allowed = allowed & same[:, None, None]
    return allowed


def _logits(q, k, scale):
    return jnp.einsum("BKGTH,BKSH->BKGTS", q.astype(jnp.float32), k.astype(jnp.float32)) * scale


def forward(q, k, v, tables: BlockTables, segments, *, scale: float):
    """Masked softmax attention in float32 over padded operands; returns ``(out, lse)`` like the kernels."""
    s = jnp.where(_allowed(tables, segments), _logits(q, k, scale), -jnp.inf)
    m = jnp.max(s, axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    denom = jnp.sum(p, axis=-1)
    l_safe = jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("BKGTS,BKSH->BKGTH", p, v.astype(jnp.float32)) / l_safe[..., None]
    lse = jnp.where(denom > 0, m_safe + jnp.log(l_safe), -jnp.inf)
    return out.astype(q.dtype), lse


def backward(q, k, v, tables: BlockTables, segments, lse, delta, do, *, scale: float):
    """``(dq, dk, dv)`` from the flash-attention identities the kernels use, computed densely.

    ``p = exp(s - lse)``, ``dv = p^T dO``, ``ds = p * (dO v^T - delta)``, ``dq = scale ds k``, ``dk = scale ds^T q``;
    ``delta`` already carries any cotangent of the log-sum-exp.
    """
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    p = jnp.where(_allowed(tables, segments), jnp.exp(_logits(q, k, scale) - lse[..., None]), 0.0)
    do = do.astype(jnp.float32)
    dv = jnp.einsum("BKGTS,BKGTH->BKSH", p, do)
    dp = jnp.einsum("BKGTH,BKSH->BKGTS", do, v.astype(jnp.float32))
    ds = p * (dp - delta[..., None])
    dq = jnp.einsum("BKGTS,BKSH->BKGTH", ds, k.astype(jnp.float32)) * scale
    dk = jnp.einsum("BKGTS,BKGTH->BKSH", ds, q.astype(jnp.float32)) * scale
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
