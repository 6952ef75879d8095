"""The jnp reference attention that every other attention path in qv-jax is checked against.

Queries ``[B, N, T, H]``, keys and values ``[B, K, S, H]``, ``N`` a multiple of ``K`` (the ``G = N / K`` query
heads of a group share one KV head). What attends to what is described by positions and segment ids, never by a
mask the caller builds, so the same arguments drive the block-sparse kernels (docs/attention.md):

- ``causal``: a query at position ``p`` sees keys at positions ``<= p``;
- ``q_positions [B, T]`` / ``kv_positions [B, S]``: bottom-right aligned by default (the queries are the last
  ``T`` of ``S`` positions), as chunked prefill after a cache needs;
- ``q_segment_ids [B, T]`` / ``kv_segment_ids [B, S]``: a query sees only keys of its own segment; a negative key
  id marks padding or an empty cache slot and is never seen.

A query that sees no key gets a zero output and a log-sum-exp of ``-inf``. This path materialises float32 logits
``[B, K, G, T, S]``: an oracle, not a production kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qv_jax.errors import InputError
from qv_jax.kernels.flash import merge_by_lse

Array = jax.Array


def check_shapes(q_BNTH: Array, k_BKSH: Array, v_BKSH: Array) -> None:
    """Raise :class:`InputError` unless the operands have the layout every attention here takes."""
    if q_BNTH.ndim != 4 or k_BKSH.ndim != 4 or v_BKSH.shape != k_BKSH.shape:
        raise InputError(
            f"attention wants q [B, N, T, H] and k / v [B, K, S, H]; got {q_BNTH.shape}, {k_BKSH.shape}, {v_BKSH.shape}"
        )
    B, N, _, H = q_BNTH.shape
    if k_BKSH.shape[0] != B or k_BKSH.shape[3] != H:
        raise InputError(f"q {q_BNTH.shape} and k {k_BKSH.shape} disagree on batch or head dim")
    if N % k_BKSH.shape[1]:
        raise InputError(f"{N} query heads are not a multiple of {k_BKSH.shape[1]} KV heads")


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
    mask_BTS = jnp.ones((batch, q_len, kv_len), bool)
    if causal:
        if q_positions is None:
            q_positions = jnp.arange(kv_len - q_len, kv_len)
        if kv_positions is None:
            kv_positions = jnp.arange(kv_len)
        q_pos_BT = jnp.broadcast_to(q_positions, (batch, q_len))
        kv_pos_BS = jnp.broadcast_to(kv_positions, (batch, kv_len))
        mask_BTS &= kv_pos_BS[:, None, :] <= q_pos_BT[:, :, None]
    if kv_segment_ids is not None:
        kv_seg_BS = jnp.broadcast_to(kv_segment_ids, (batch, kv_len))
        mask_BTS &= (kv_seg_BS >= 0)[:, None, :]
        if q_segment_ids is not None:
            q_seg_BT = jnp.broadcast_to(q_segment_ids, (batch, q_len))
            mask_BTS &= q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]
    elif q_segment_ids is not None:
        raise InputError("q_segment_ids given without kv_segment_ids")
    return mask_BTS


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
    """Softmax attention computed in float32.

    Args:
      q: queries ``[B, N, T, H]``.
      k, v: keys and values ``[B, K, S, H]``.
      causal, q_positions, kv_positions, q_segment_ids, kv_segment_ids: what attends to what (module docstring).
      mask: ``[B, T, S]`` or ``[B, K, T, S]`` booleans (True = attend) combined with the rest (tests and the
        patterns' reference only).
      scale: logit scale, default ``H ** -0.5``.
      return_lse: also return the log-sum-exp of the scaled logits.

    Returns:
      ``[B, N, T, H]`` in ``q.dtype``; with ``return_lse`` also ``[B, N, T]`` float32.
    """
    check_shapes(q, k, v)
    B, N, T, H = q.shape
    _, K, S, _ = k.shape
    G = N // K
    scale = H**-0.5 if scale is None else scale
    allowed_B1TS = attention_mask(
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
        allowed_B1TS &= mask if mask.ndim == 4 else mask[:, None]
    allowed_BKGTS = allowed_B1TS[:, :, None]

    q_BKGTH = q.reshape(B, K, G, T, H).astype(jnp.float32)
    logits_BKGTS = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k.astype(jnp.float32)) * scale
    logits_BKGTS = jnp.where(allowed_BKGTS, logits_BKGTS, -jnp.inf)
    row_max_BKGT = jnp.max(logits_BKGTS, axis=-1)
    safe_max_BKGT = jnp.where(jnp.isfinite(row_max_BKGT), row_max_BKGT, 0.0)
    p_BKGTS = jnp.exp(logits_BKGTS - safe_max_BKGT[..., None])
    denom_BKGT = jnp.sum(p_BKGTS, axis=-1)
    out_BKGTH = jnp.einsum("BKGTS,BKSH->BKGTH", p_BKGTS, v.astype(jnp.float32))
    out_BKGTH = out_BKGTH / jnp.where(denom_BKGT > 0, denom_BKGT, 1.0)[..., None]
    out_BNTH = out_BKGTH.reshape(B, N, T, H).astype(q.dtype)
    if not return_lse:
        return out_BNTH
    lse_BKGT = jnp.where(denom_BKGT > 0, safe_max_BKGT + jnp.log(denom_BKGT), -jnp.inf)
    return out_BNTH, lse_BKGT.reshape(B, N, T)


def merge_attention(*parts: tuple[Array, Array]) -> tuple[Array, Array]:
    """Attention over the union of disjoint key sets from ``(out, lse)`` pairs over each set.

    ``out`` and ``lse`` are any matching shapes ``[..., H]`` / ``[...]``; a part that saw nothing has ``lse = -inf``.
    """
    out, lse = merge_by_lse(jnp.stack([o for o, _ in parts]), jnp.stack([lse for _, lse in parts]), axis=0)
    return out.astype(parts[0][0].dtype), lse
