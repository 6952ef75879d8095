"""Dense attention: the jnp reference that every other attention path in qv-jax is checked against.

Layout: queries ``[B, Hq, T, D]``, keys and values ``[B, Hkv, S, D]`` with ``Hq`` a multiple of ``Hkv`` (GQA: the
``Hq // Hkv`` query heads of a group share one KV head). What attends to what is described by positions and
segment ids rather than by a materialised mask, so the same arguments drive the block-sparse kernels:

- ``causal``: a query at position ``p`` sees keys at positions ``<= p``;
- ``q_positions`` ``[B, T]`` / ``kv_positions`` ``[B, S]``: default to bottom-right alignment (the queries are the
  last ``T`` of ``S`` positions), which is what chunked prefill after a cache needs;
- ``q_segment_ids`` ``[B, T]`` / ``kv_segment_ids`` ``[B, S]``: a query sees only keys of its own segment (packed
  sequences, vision windows); a negative key segment id marks padding or an empty cache slot and is never seen.

A query that sees no key at all gets a zero output and a log-sum-exp of ``-inf``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qv_jax.errors import InputError

Array = jax.Array


def _check_shapes(q: Array, k: Array, v: Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise InputError(f"attention wants q [B,Hq,T,D], k/v [B,Hkv,S,D]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise InputError(f"k {k.shape} and v {v.shape} differ")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise InputError(f"q {q.shape} and k {k.shape} disagree on batch or head dim")
    if q.shape[1] % k.shape[1]:
        raise InputError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")


def attention_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    q_positions: Array | None = None,
    kv_positions: Array | None = None,
    q_segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
) -> Array:
    """Boolean ``[B, T, S]`` mask, True where a query may attend to a key."""
    mask = jnp.ones((batch, q_len, kv_len), bool)
    if causal:
        if q_positions is None:
            q_positions = jnp.arange(kv_len - q_len, kv_len)
        if kv_positions is None:
            kv_positions = jnp.arange(kv_len)
        q_pos_BT = jnp.broadcast_to(q_positions, (batch, q_len))
        kv_pos_BS = jnp.broadcast_to(kv_positions, (batch, kv_len))
        mask &= kv_pos_BS[:, None, :] <= q_pos_BT[:, :, None]
    if kv_segment_ids is not None:
        kv_seg_BS = jnp.broadcast_to(kv_segment_ids, (batch, kv_len))
        mask &= (kv_seg_BS >= 0)[:, None, :]
        if q_segment_ids is not None:
            q_seg_BT = jnp.broadcast_to(q_segment_ids, (batch, q_len))
            mask &= q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]
    elif q_segment_ids is not None:
        raise InputError("q_segment_ids given without kv_segment_ids")
    return mask


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = True,
    q_positions: Array | None = None,
    kv_positions: Array | None = None,
    q_segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
    mask: Array | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """Softmax attention computed in float32; returns ``[B, Hq, T, D]`` in ``q.dtype``.

    ``mask`` (``[B, T, S]`` or ``[B, Hkv, T, S]``, True = attend) is combined with the mask the other arguments
    describe. With ``return_lse`` also returns the log-sum-exp of the scaled logits, ``[B, Hq, T]`` float32.
    """
    _check_shapes(q, k, v)
    B, Hq, T, D = q.shape
    _, Hkv, S, _ = k.shape
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    allowed = attention_mask(
        B,
        T,
        S,
        causal=causal,
        q_positions=q_positions,
        kv_positions=kv_positions,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
    )[:, None]
    if mask is not None:
        allowed &= mask if mask.ndim == 4 else mask[:, None]
    allowed_BKGTS = allowed[:, :, None]

    q_BKGTD = q.reshape(B, Hkv, G, T, D).astype(jnp.float32)
    logits_BKGTS = jnp.einsum("BKGTD,BKSD->BKGTS", q_BKGTD, k.astype(jnp.float32)) * scale
    logits_BKGTS = jnp.where(allowed_BKGTS, logits_BKGTS, -jnp.inf)
    row_max_BKGT = jnp.max(logits_BKGTS, axis=-1)
    safe_max_BKGT = jnp.where(jnp.isfinite(row_max_BKGT), row_max_BKGT, 0.0)
    p_BKGTS = jnp.exp(logits_BKGTS - safe_max_BKGT[..., None])
    denom_BKGT = jnp.sum(p_BKGTS, axis=-1)
    out_BKGTD = jnp.einsum("BKGTS,BKSD->BKGTD", p_BKGTS, v.astype(jnp.float32))
    out_BKGTD = out_BKGTD / jnp.where(denom_BKGT > 0, denom_BKGT, 1.0)[..., None]
    out = out_BKGTD.reshape(B, Hq, T, D).astype(q.dtype)
    if not return_lse:
        return out
    lse_BKGT = jnp.where(denom_BKGT > 0, safe_max_BKGT + jnp.log(denom_BKGT), -jnp.inf)
    return out, lse_BKGT.reshape(B, Hq, T)
