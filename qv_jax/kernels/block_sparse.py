"""Block-sparse attention over ``BlockTables``: one entry point for the TPU and GPU kernels and their reference.

``block_sparse_attention`` pads ``q [B, N, T, H]`` and ``k``/``v [B, K, S, H]`` to what the kernels take (q grouped
by KV head, ``[B, K, G, Tp, Hp]``; k/v ``[B, K, Sp, Hp]``; ``Tp`` / ``Sp`` whole tiles, ``Hp`` from
:func:`padded_head_dim`), runs the chosen implementation (:data:`IMPLEMENTATIONS`: Mosaic, Triton, the tiles in jnp
(``chunked``) or the dense jnp reference; ``interpret``: in the CPU interpreter) and slices the result back. Its
``jax.custom_vjp`` gradient runs the matching dq and dk/dv passes, so training through a sparse pattern never
materialises the ``T x S`` matrix (but with ``reference``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qv_jax.errors import InputError
from qv_jax.kernels import block_sparse_chunked, block_sparse_gpu, block_sparse_reference, block_sparse_tpu
from qv_jax.kernels.block_tables import BlockTables
from qv_jax.kernels.padding import pad_axis, triton_dot_size

IMPLEMENTATIONS = ("tpu", "gpu", "chunked", "reference")
# the jnp implementations: the tiles' online softmax (memory O(T x block)) and the dense masked oracle
_REFERENCES = {"chunked": block_sparse_chunked, "reference": block_sparse_reference}
_INT_MAX = int(jnp.iinfo(jnp.int32).max)
_INT_MIN = int(jnp.iinfo(jnp.int32).min)


def padded_head_dim(head_dim: int, impl: str) -> int:
    """Head dim the kernel computes with: a multiple of 128 lanes on TPU, a power of two (>= 16) for Triton."""
    if impl == "tpu":
        return -(-head_dim // 128) * 128
    if impl == "gpu":
        return triton_dot_size(head_dim)
    return head_dim


def _check_tiles(impl: str, block_q: int, block_kv: int) -> None:
    """Tile shapes each kernel can express: Triton wants powers of two >= 16 (``tl.dot``); Mosaic wants whole
    sublanes for the query tile and, for key tiles wider than one vreg, whole 128-lane vregs."""
    if impl == "gpu":
        for name, b in (("block_q", block_q), ("block_kv", block_kv)):
            if b < 16 or b & (b - 1):
                raise InputError(f"GPU kernel: {name}={b} must be a power of two >= 16")
    elif impl == "tpu":
        if block_q % 8 or (block_kv > 128 and block_kv % 128):
            raise InputError(
                f"TPU kernel: block_q={block_q} must be a multiple of 8 and block_kv={block_kv} at most 128 or a "
                "multiple of 128"
            )


def segment_operands(q_seg, kv_seg, tables: BlockTables):
    """Segment ids padded to the tiles (``q [B, Tp]``, ``kv [B, Sp]`` int32) plus per-block id ranges.

    Negative key ids (padding, empty cache slots) and padded key columns become ``INT_MIN`` and negative query ids
    ``INT_MIN + 1``, so an equality test alone masks them; padded query rows repeat the last real id so they do
    not widen their block's range. ``ranges [B, 2, q_blocks + kv_blocks]`` holds the (min, max) id of each query
    block then of each key block (ignoring negative key ids); a tile whose ranges do not intersect is skipped at run
    time.
    """
    B = q_seg.shape[0]
    bq, bkv = tables.block_q, tables.block_kv
    q_blocks, kv_blocks = tables.num_q_blocks, tables.num_kv_blocks
    # the kernels only test equality: give negative ids values that can never be equal across q and kv
    q_seg = jnp.where(q_seg < 0, _INT_MIN + 1, q_seg.astype(jnp.int32))
    kv_seg = jnp.where(kv_seg < 0, _INT_MIN, kv_seg.astype(jnp.int32))
    q_seg = pad_axis(q_seg, 1, q_blocks * bq, mode="edge")
    kv_seg = pad_axis(kv_seg, 1, kv_blocks * bkv, value=_INT_MIN)
    q_by_block = q_seg.reshape(B, q_blocks, bq)
    kv_by_block = kv_seg.reshape(B, kv_blocks, bkv)
    lo = jnp.concatenate([q_by_block.min(-1), jnp.where(kv_by_block >= 0, kv_by_block, _INT_MAX).min(-1)], axis=1)
    hi = jnp.concatenate([q_by_block.max(-1), kv_by_block.max(-1)], axis=1)
    return {"q": q_seg, "kv": kv_seg, "ranges": jnp.stack([lo, hi], axis=1)}


def _run_forward(q, k, v, segs, tables, scale, impl, interpret):
    if impl == "tpu":
        return block_sparse_tpu.forward(q, k, v, tables, segs, scale=scale, interpret=interpret)
    if impl == "gpu":
        return block_sparse_gpu.forward(q, k, v, tables, segs, scale=scale, interpret=interpret)
    return _REFERENCES[impl].forward(q, k, v, tables, segs, scale=scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q, k, v, segs, tables, scale, impl, interpret):
    return _run_forward(q, k, v, segs, tables, scale, impl, interpret)


def _attention_fwd(q, k, v, segs, tables, scale, impl, interpret):
    out, lse = _run_forward(q, k, v, segs, tables, scale, impl, interpret)
    return (out, lse), (q, k, v, segs, out, lse)


def _attention_bwd(tables, scale, impl, interpret, residuals, cotangents):
    q, k, v, segs, out, lse = residuals
    d_out, d_lse = cotangents
    # d lse_i / d s_ij = p_ij, so a cotangent on the lse folds into delta: ds = p * (dp - (delta - d_lse))
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse
    d_out = d_out.astype(q.dtype)
    if impl == "tpu":
        grads = block_sparse_tpu.backward(q, k, v, tables, segs, lse, delta, d_out, scale=scale, interpret=interpret)
    elif impl == "gpu":
        grads = block_sparse_gpu.backward(q, k, v, tables, segs, lse, delta, d_out, scale=scale, interpret=interpret)
    else:
        grads = _REFERENCES[impl].backward(q, k, v, tables, segs, lse, delta, d_out, scale=scale)
    zero_segs = None if segs is None else jax.tree.map(_zero_cotangent, segs)
    return (*grads, zero_segs)


def _zero_cotangent(x):
    return jnp.zeros(x.shape, jax.dtypes.float0)


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    tables: BlockTables,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    impl: str = "tpu",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Attention of ``q`` over ``k`` / ``v`` restricted to the tiles of ``tables``; differentiable in q, k and v.

    Args:
      q: ``[B, N, T, H]``.
      k, v: ``[B, K, S, H]``.
      tables: built for ``T`` and ``S``, with one row per KV head or a single shared row.
      q_segment_ids, kv_segment_ids: ``[B, T]`` / ``[B, S]``, both or neither: attention further restricted to equal
        ids; a negative key id is padding.
      scale: logit scale, ``H ** -0.5`` by default.
      impl: one of :data:`IMPLEMENTATIONS`; ``interpret`` runs it in the CPU interpreter.

    Returns:
      ``out [B, N, T, H]`` in ``q.dtype`` and the log-sum-exp ``[B, N, T]`` float32 (``-inf`` for a query that sees
      no key; its output is zero).
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLEMENTATIONS}")
    B, N, T, H = q.shape
    K, S = k.shape[1], k.shape[2]
    G = N // K
    if (T, S) != (tables.q_len, tables.kv_len):
        raise ValueError(f"tables were built for T={tables.q_len}, S={tables.kv_len}; got T={T}, S={S}")
    if tables.num_heads not in (1, K):
        raise ValueError(f"tables have {tables.num_heads} rows for {K} KV heads (want {K} or 1)")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    _check_tiles(impl, tables.block_q, tables.block_kv)
    scale = H**-0.5 if scale is None else float(scale)
    Tp = tables.num_q_blocks * tables.block_q
    Sp = tables.num_kv_blocks * tables.block_kv
    Hp = padded_head_dim(H, impl)

    qp = pad_axis(pad_axis(q.reshape(B, K, G, T, H), 3, Tp), 4, Hp)  # [B, K, G, Tp, Hp]
    kp = pad_axis(pad_axis(k, 2, Sp), 3, Hp)
    vp = pad_axis(pad_axis(v, 2, Sp), 3, Hp)
    segs = None
    if q_segment_ids is not None:
        segs = segment_operands(
            jnp.broadcast_to(q_segment_ids, (B, T)), jnp.broadcast_to(kv_segment_ids, (B, S)), tables
        )
    out, lse = _attention(qp, kp, vp, segs, tables, scale, impl, interpret)
    out = out[:, :, :, :T, :H].reshape(B, N, T, H)
    return out, lse[:, :, :, :T].reshape(B, N, T)
