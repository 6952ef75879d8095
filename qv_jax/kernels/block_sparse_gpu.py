"""Block-sparse flash attention for GPU (Pallas, Triton backend): forward, dq and dk/dv kernels over ``BlockTables``.

Forward and dq: one program per (query block, batch, query head) loops over its visit list, so a streaming head
costs only the tiles it visits. The ``G`` query heads of a group are separate programs sharing K/V tiles through L2
(Triton tiles must be powers of two, and Qwen2.5-VL-7B has G = 7). dk/dv: one program per (key block, batch, KV head)
loops over the group's query heads and their visited query blocks, summing in registers without atomics.

Operands come padded from ``kernels.block_sparse`` (``Hp`` a power of two); tiles are powers of two >= 16
(``tl.dot``). See docs/attention.md, "How the kernels skip work".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from qv_jax.kernels.block_tables import BlockTables
from qv_jax.kernels.compat import pl, triton_compiler_params
from qv_jax.kernels.flash import MASK_VALUE, NN_DIMS, NT_DIMS, dot, finish, precision_for, softmax_step


def _num_warps(block_q: int, block_kv: int, head_dim: int) -> int:
    return 8 if block_q * max(block_kv, head_dim) >= 128 * 128 else 4


def _full(shape):
    """A block covering a whole array (the kernel slices it dynamically)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _tile_keep(masks_ref, mask_idx, seg_row, seg_col):
    """Boolean keep-mask of one tile: its element mask (or all-true for a full tile) and equal segment ids."""
    keep = (masks_ref[jnp.maximum(mask_idx, 0)] != 0) | (mask_idx < 0)
    if seg_row is not None:
        keep = keep & (seg_row[:, None] == seg_col[None, :])
    return keep


def _fwd_kernel(
    kv_block_ref,
    kv_mask_ref,
    kv_count_ref,
    q_ref,
    k_ref,
    v_ref,
    masks_ref,
    q_seg_ref,
    kv_seg_ref,
    o_ref,
    lse_ref,
    *,
    scale,
    groups,
    shared,
    precision,
):
    i, head = pl.program_id(0), pl.program_id(2)
    row = 0 if shared else head // groups
    bq, bkv = masks_ref.shape[1:]
    q = q_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]

    def visit(entry, carry):
        m_prev, l_prev, acc = carry
        keys = pl.ds(kv_block_ref[row, i, entry] * bkv, bkv)
        k = k_ref[keys, :]
        v = v_ref[keys, :]
        kv_seg = None if kv_seg_ref is None else kv_seg_ref[keys]
        keep = _tile_keep(masks_ref, kv_mask_ref[row, i, entry], q_seg, kv_seg)
        s = jnp.where(keep, dot(q, k, NT_DIMS, precision) * scale, MASK_VALUE)
        return softmax_step(s, keep, v, m_prev, l_prev, acc, precision)

    init = (
        jnp.full((bq,), MASK_VALUE, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros(q.shape, jnp.float32),
    )
    m, denom, acc = lax.fori_loop(0, kv_count_ref[row, i], visit, init)
    out, lse_ref[...] = finish(acc, m, denom)
    o_ref[...] = out.astype(o_ref.dtype)


def forward(q, k, v, tables: BlockTables, segments, *, scale: float, interpret: bool):
    """Forward on padded operands ``q [B, K, G, Tp, Hp]``, ``k``/``v [B, K, Sp, Hp]``; returns (out, lse)."""
    B, K, G, Tp, Hp = q.shape
    Sp = k.shape[2]
    bq, bkv = tables.block_q, tables.block_kv
    N = K * G
    q_heads = q.reshape(B, N, Tp, Hp)
    in_specs = [
        _full(tables.kv_block.shape),
        _full(tables.kv_mask.shape),
        _full(tables.kv_count.shape),
        pl.BlockSpec((None, None, bq, Hp), lambda i, b, head: (b, head, i, 0)),
        pl.BlockSpec((None, None, Sp, Hp), lambda i, b, head: (b, head // G, 0, 0)),
        pl.BlockSpec((None, None, Sp, Hp), lambda i, b, head: (b, head // G, 0, 0)),
        _full(tables.masks.shape),
    ]
    operands = [
        jnp.asarray(tables.kv_block),
        jnp.asarray(tables.kv_mask),
        jnp.asarray(tables.kv_count),
        q_heads,
        k,
        v,
        jnp.asarray(tables.masks),
    ]
    if segments is not None:
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, b, head: (b, i)),
            pl.BlockSpec((None, Sp), lambda i, b, head: (b, 0)),
        ]
        operands += [segments["q"], segments["kv"]]
    kernel = functools.partial(
        _with_optional_segments,
        body=_fwd_kernel,
        num_before=7,
        has_segments=segments is not None,
        kw=dict(scale=scale, groups=G, shared=tables.num_heads == 1, precision=precision_for(q.dtype)),
    )
    out, lse = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(q_heads.shape, q.dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)],
        grid=(tables.num_q_blocks, B, N),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bq, Hp), lambda i, b, head: (b, head, i, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, head: (b, head, i)),
        ],
        compiler_params=triton_compiler_params(num_warps=_num_warps(bq, bkv, Hp), num_stages=2),
        interpret=interpret,
        name="block_sparse_attention_fwd",
    )(*operands)
    return out.reshape(q.shape), lse.reshape(B, K, G, Tp)


def _with_optional_segments(*refs, body, num_before, has_segments, kw):
    """Insert ``None`` for the two segment refs when the call has no segment ids."""
    refs = list(refs)
    if not has_segments:
        refs[num_before:num_before] = [None, None]
    return body(*refs, **kw)


def _dq_kernel(
    kv_block_ref,
    kv_mask_ref,
    kv_count_ref,
    q_ref,
    k_ref,
    v_ref,
    masks_ref,
    do_ref,
    lse_ref,
    delta_ref,
    q_seg_ref,
    kv_seg_ref,
    dq_ref,
    *,
    scale,
    groups,
    shared,
    precision,
):
    i, head = pl.program_id(0), pl.program_id(2)
    row = 0 if shared else head // groups
    bkv = masks_ref.shape[2]
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]

    def visit(entry, dq):
        keys = pl.ds(kv_block_ref[row, i, entry] * bkv, bkv)
        k = k_ref[keys, :]
        v = v_ref[keys, :]
        kv_seg = None if kv_seg_ref is None else kv_seg_ref[keys]
        keep = _tile_keep(masks_ref, kv_mask_ref[row, i, entry], q_seg, kv_seg)
        s = dot(q, k, NT_DIMS, precision) * scale
        p = jnp.where(keep, jnp.exp(s - lse[:, None]), 0.0)
        ds = p * (dot(do, v, NT_DIMS, precision) - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k, NN_DIMS, precision)

    dq = lax.fori_loop(0, kv_count_ref[row, i], visit, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_block_ref,
    q_mask_ref,
    q_count_ref,
    q_ref,
    k_ref,
    v_ref,
    masks_t_ref,
    do_ref,
    lse_ref,
    delta_ref,
    q_seg_ref,
    kv_seg_ref,
    dk_ref,
    dv_ref,
    *,
    scale,
    groups,
    shared,
    precision,
):
    j, head = pl.program_id(0), pl.program_id(2)
    row = 0 if shared else head
    bq = masks_t_ref.shape[2]
    k = k_ref[...]
    v = v_ref[...]
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]

    def visit_head(g):
        def visit(entry, carry):
            dk, dv = carry
            queries = pl.ds(q_block_ref[row, j, entry] * bq, bq)
            q = q_ref[g, queries, :]
            do = do_ref[g, queries, :]
            q_seg = None if q_seg_ref is None else q_seg_ref[queries]
            keep_t = _tile_keep(masks_t_ref, q_mask_ref[row, j, entry], kv_seg, q_seg)  # [bkv, bq]
            s_t = dot(k, q, NT_DIMS, precision) * scale
            p_t = jnp.where(keep_t, jnp.exp(s_t - lse_ref[g, queries][None, :]), 0.0)
            dv = dv + dot(p_t.astype(do.dtype), do, NN_DIMS, precision)
            ds_t = p_t * (dot(v, do, NT_DIMS, precision) - delta_ref[g, queries][None, :])
            return dk + dot(ds_t.astype(q.dtype), q, NN_DIMS, precision), dv

        return visit

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for g in range(groups):
        carry = lax.fori_loop(0, q_count_ref[row, j], visit_head(g), carry)
    dk, dv = carry
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, tables: BlockTables, segments, lse, delta, do, *, scale: float, interpret: bool):
    """Gradients ``(dq, dk, dv)`` of :func:`forward`; ``lse``/``delta`` are ``[B, K, G, Tp]`` float32."""
    B, K, G, Tp, Hp = q.shape
    Sp = k.shape[2]
    bq, bkv = tables.block_q, tables.block_kv
    N = K * G
    shared = tables.num_heads == 1
    prec = precision_for(q.dtype)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # rows that saw nothing are fully masked in every tile
    params = triton_compiler_params(num_warps=_num_warps(bq, bkv, Hp), num_stages=2)
    kw = dict(scale=scale, groups=G, shared=shared, precision=prec)

    q_spec = pl.BlockSpec((None, None, bq, Hp), lambda i, b, head: (b, head, i, 0))
    kv_slab = pl.BlockSpec((None, None, Sp, Hp), lambda i, b, head: (b, head // G, 0, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, head: (b, head, i))
    in_specs = [
        _full(tables.kv_block.shape),
        _full(tables.kv_mask.shape),
        _full(tables.kv_count.shape),
        q_spec,
        kv_slab,
        kv_slab,
        _full(tables.masks.shape),
        q_spec,
        row_spec,
        row_spec,
    ]
    operands = [
        jnp.asarray(tables.kv_block),
        jnp.asarray(tables.kv_mask),
        jnp.asarray(tables.kv_count),
        q.reshape(B, N, Tp, Hp),
        k,
        v,
        jnp.asarray(tables.masks),
        do.reshape(B, N, Tp, Hp),
        lse.reshape(B, N, Tp),
        delta.reshape(B, N, Tp),
    ]
    if segments is not None:
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, b, head: (b, i)),
            pl.BlockSpec((None, Sp), lambda i, b, head: (b, 0)),
        ]
        operands += [segments["q"], segments["kv"]]
    dq = pl.pallas_call(
        functools.partial(
            _with_optional_segments, body=_dq_kernel, num_before=10, has_segments=segments is not None, kw=kw
        ),
        out_shape=jax.ShapeDtypeStruct((B, N, Tp, Hp), q.dtype),
        grid=(tables.num_q_blocks, B, N),
        in_specs=in_specs,
        out_specs=q_spec,
        compiler_params=params,
        interpret=interpret,
        name="block_sparse_attention_dq",
    )(*operands)

    group_slab = pl.BlockSpec((None, None, G, Tp, Hp), lambda j, b, head: (b, head, 0, 0, 0))
    group_rows = pl.BlockSpec((None, None, G, Tp), lambda j, b, head: (b, head, 0, 0))
    kv_tile = pl.BlockSpec((None, None, bkv, Hp), lambda j, b, head: (b, head, j, 0))
    in_specs = [
        _full(tables.q_block.shape),
        _full(tables.q_mask.shape),
        _full(tables.q_count.shape),
        group_slab,
        kv_tile,
        kv_tile,
        _full(tables.masks_t.shape),
        group_slab,
        group_rows,
        group_rows,
    ]
    operands = [
        jnp.asarray(tables.q_block),
        jnp.asarray(tables.q_mask),
        jnp.asarray(tables.q_count),
        q,
        k,
        v,
        jnp.asarray(tables.masks_t),
        do,
        lse,
        delta,
    ]
    if segments is not None:
        in_specs += [
            pl.BlockSpec((None, Tp), lambda j, b, head: (b, 0)),
            pl.BlockSpec((None, bkv), lambda j, b, head: (b, j)),
        ]
        operands += [segments["q"], segments["kv"]]
    dk, dv = pl.pallas_call(
        functools.partial(
            _with_optional_segments, body=_dkv_kernel, num_before=10, has_segments=segments is not None, kw=kw
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid=(tables.num_kv_blocks, B, K),
        in_specs=in_specs,
        out_specs=[kv_tile, kv_tile],
        compiler_params=params,
        interpret=interpret,
        name="block_sparse_attention_dkv",
    )(*operands)
    return dq.reshape(q.shape), dk, dv
