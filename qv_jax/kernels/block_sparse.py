"""Block-sparse attention over ``BlockTables``: one entry point for the TPU and GPU kernels and their reference.

``block_sparse_attention`` pads the operands to the kernel's tiles, runs the chosen implementation and slices the
result back; its gradient (``jax.custom_vjp``) runs the matching dq and dk/dv kernels, so training through a sparse
pattern (LongGen finetuning, DuoAttention gates) never materialises the ``T x S`` matrix.

Implementations: ``"tpu"`` (Mosaic, ``kernels.block_sparse_tpu``), ``"gpu"`` (Triton, ``kernels.block_sparse_gpu``)
and ``"reference"`` (``kernels.block_sparse_reference``: the tables expanded to a dense mask, in jnp). ``interpret``
runs a Pallas implementation in the CPU interpreter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qv_jax.errors import InputError
from qv_jax.kernels import block_sparse_gpu, block_sparse_reference, block_sparse_tpu
from qv_jax.kernels.block_tables import BlockTables
from qv_jax.kernels.padding import pad_axis, triton_dot_size

IMPLEMENTATIONS = ("tpu", "gpu", "reference")
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
    not widen their block's range. ``ranges [B, 2, nq + nk]`` holds the (min, max) id of each query block then of each
    key block (ignoring negative key ids); a tile whose ranges do not intersect is skipped at run time.
    """
    B = q_seg.shape[0]
    bq, bkv = tables.block_q, tables.block_kv
    nq, nk = tables.num_q_blocks, tables.num_kv_blocks
    # the kernels only test equality: give negative ids values that can never be equal across q and kv
    q_seg = jnp.where(q_seg < 0, _INT_MIN + 1, q_seg.astype(jnp.int32))
    kv_seg = jnp.where(kv_seg < 0, _INT_MIN, kv_seg.astype(jnp.int32))
    q_seg = pad_axis(q_seg, 1, nq * bq, mode="edge")
    kv_seg = pad_axis(kv_seg, 1, nk * bkv, value=_INT_MIN)
    q_blocks = q_seg.reshape(B, nq, bq)
    kv_blocks = kv_seg.reshape(B, nk, bkv)
    lo = jnp.concatenate([q_blocks.min(-1), jnp.where(kv_blocks >= 0, kv_blocks, _INT_MAX).min(-1)], axis=1)
    hi = jnp.concatenate([q_blocks.max(-1), kv_blocks.max(-1)], axis=1)
    return {"q": q_seg, "kv": kv_seg, "ranges": jnp.stack([lo, hi], axis=1)}


def _run_forward(q, k, v, segs, tables, scale, impl, interpret):
    if impl == "tpu":
        return block_sparse_tpu.forward(q, k, v, tables, segs, scale=scale, interpret=interpret)
    if impl == "gpu":
        return block_sparse_gpu.forward(q, k, v, tables, segs, scale=scale, interpret=interpret)
    return block_sparse_reference.forward(q, k, v, tables, segs, scale=scale)


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
        grads = block_sparse_reference.backward(q, k, v, tables, segs, lse, delta, d_out, scale=scale)
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
    """Attention of ``q [B, Hq, T, D]`` over ``k``/``v [B, Hkv, S, D]`` restricted to the tiles of ``tables``.

    ``tables`` must have been built for ``T`` and ``S`` and have one row per KV head or a single shared row.
    Segment ids (``[B, T]`` / ``[B, S]``, both or neither) further restrict attention to equal ids; a negative key
    id is padding. Returns ``out [B, Hq, T, D]`` in ``q.dtype`` and the log-sum-exp ``[B, Hq, T]`` float32
    (``-inf`` for a query that sees no key; its output is zero). Differentiable in ``q``, ``k`` and ``v``.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLEMENTATIONS}")
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if (T, S) != (tables.q_len, tables.kv_len):
        raise ValueError(f"tables were built for T={tables.q_len}, S={tables.kv_len}; got T={T}, S={S}")
    if tables.num_heads not in (1, Hkv):
        raise ValueError(f"tables have {tables.num_heads} head rows for {Hkv} KV heads")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
    _check_tiles(impl, tables.block_q, tables.block_kv)
    scale = D**-0.5 if scale is None else float(scale)
    Tp = tables.num_q_blocks * tables.block_q
    Sp = tables.num_kv_blocks * tables.block_kv
    Dp = padded_head_dim(D, impl)

    q5 = pad_axis(pad_axis(q.reshape(B, Hkv, G, T, D), 3, Tp), 4, Dp)
    kp = pad_axis(pad_axis(k, 2, Sp), 3, Dp)
    vp = pad_axis(pad_axis(v, 2, Sp), 3, Dp)
    segs = None
    if q_segment_ids is not None:
        segs = segment_operands(
            jnp.broadcast_to(q_segment_ids, (B, T)), jnp.broadcast_to(kv_segment_ids, (B, S)), tables
        )
    out, lse = _attention(q5, kp, vp, segs, tables, scale, impl, interpret)
    out = out[:, :, :, :T, :D].reshape(B, Hq, T, D)
    return out, lse[:, :, :, :T].reshape(B, Hq, T)
