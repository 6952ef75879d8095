"""Block-sparse flash attention for TPU (Mosaic): forward, dq and dk/dv kernels driven by ``BlockTables``.

Grid. The visit lists of every (KV head, query block) row are flattened into one list of *steps*, scalar-prefetched
into SMEM, and the grid is ``(batch, step)``: a step names the KV head, the query block, the key block to load and
its mask, and whether it starts or ends its row. So the kernel runs exactly one grid step per visited tile (plus one
per row that visits nothing, to write its zero output) whatever mix of dense and streaming heads the tables hold;
padding each row to the longest row would make a streaming head cost as many grid steps as a dense one. Consecutive
steps of a row keep the same output block index, so the output tile stays in VMEM while the row accumulates.

GQA. The ``G`` query heads of a KV group share the pattern, so a step loads one K/V tile and runs all ``G`` heads
against it (q / out tiles are ``[G, block_q, D]``).

Layouts follow the TPU vreg (8 sublanes x 128 lanes): per-row statistics are kept lane-replicated ``[rows, 128]``;
the dk/dv kernel works key-major (``s^T = k q^T``) so that per-query statistics enter as rows ``[8, block_q]``.
Head dims are padded to a multiple of 128 and sequence lengths to the block sizes by the caller
(``kernels.block_sparse``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qv_jax.kernels.block_tables import BlockTables
from qv_jax.kernels.compat import (
    pl,
    prefetch_scalar_grid_spec,
    tpu_compiler_params,
    tpu_interpret_params,
    tpu_vmem,
)
from qv_jax.kernels.flash import (
    LANES,
    MASK_VALUE,
    NN_DIMS,
    NT_DIMS,
    SUBLANES,
    dot,
    finish_lanes,
    lanes,
    precision_for,
    softmax_step_lanes,
)

# a step is two int32 words: (q_block << 16 | kv_block) and (head << 24 | flags << 21 | mask_index + 1)
_FIRST, _LAST, _COMPUTE = 1, 2, 4
_BLOCK_BITS, _MASK_BITS = 16, 21


def flatten_steps(count: np.ndarray, blocks: np.ndarray, masks: np.ndarray, num_heads: int) -> np.ndarray:
    """Pack visit lists ``[H, R, V]`` (H = 1 or ``num_heads``) into ``[2, N]`` int32 step words, head-major."""
    rows = []
    for h in range(num_heads):
        th = h if count.shape[0] > 1 else 0
        for r in range(count.shape[1]):
            n = int(count[th, r])
            visits = max(n, 1)
            blk = blocks[th, r, :visits].astype(np.int64)
            msk = masks[th, r, :visits].astype(np.int64)
            flags = np.zeros(visits, np.int64)
            flags[0] |= _FIRST
            flags[-1] |= _LAST
            if n:
                flags |= _COMPUTE
            rows.append((np.full(visits, r), blk, np.full(visits, h), flags, msk))
    r, blk, h, flags, msk = (np.concatenate(x) for x in zip(*rows, strict=True))
    if max(r.max(), blk.max()) >= 1 << _BLOCK_BITS or msk.max() + 1 >= 1 << _MASK_BITS or h.max() >= 1 << 7:
        raise ValueError("block tables too large to pack into step words")
    word0 = (r << _BLOCK_BITS) | blk
    word1 = (h << 24) | (flags << _MASK_BITS) | (msk + 1)
    return np.stack([word0, word1]).astype(np.int32)


def _decode(steps_ref, n):
    """(row block, visited block, head, mask index, flags) of step ``n``."""
    w0 = steps_ref[0, n]
    w1 = steps_ref[1, n]
    row = lax.shift_right_logical(w0, _BLOCK_BITS)
    col = jnp.bitwise_and(w0, (1 << _BLOCK_BITS) - 1)
    head = lax.shift_right_logical(w1, 24)
    flags = jnp.bitwise_and(lax.shift_right_logical(w1, _MASK_BITS), 7)
    mask = jnp.bitwise_and(w1, (1 << _MASK_BITS) - 1) - 1
    return row, col, head, mask, flags


def _row_map(b, n, steps_ref, *_):
    """Block index of the step's row in a ``[B, Hkv, G, T, ...]`` operand (q, dO, outputs, per-row statistics)."""
    row, _, h, _, _ = _decode(steps_ref, n)
    return b, h, 0, row, 0


def _col_map(b, n, steps_ref, *_):
    """Block index of the step's visited block in a ``[B, Hkv, S, D]`` operand (k, v)."""
    _, col, h, _, _ = _decode(steps_ref, n)
    return b, h, col, 0


def _mask_map(b, n, steps_ref, *_):
    """The step's element mask (any one for a full tile, which never reads it)."""
    return jnp.maximum(_decode(steps_ref, n)[3], 0), 0, 0


def _segment_inputs(row_ids, col_ids, rows: int, cols: int) -> tuple[list, list]:
    """Block specs and operands for the segment ids ``[B, N]`` of the step's row block, lane-replicated
    ``[rows, 128]``, and of its visited block, sublane-replicated ``[8, cols]`` (whole vregs for the equality test)."""
    specs = [
        pl.BlockSpec((None, rows, LANES), lambda b, n, s, *_: (b, _decode(s, n)[0], 0)),
        pl.BlockSpec((None, SUBLANES, cols), lambda b, n, s, *_: (b, 0, _decode(s, n)[1])),
    ]
    operands = [
        jnp.broadcast_to(row_ids[:, :, None], (*row_ids.shape, LANES)),
        jnp.broadcast_to(col_ids[:, None, :], (col_ids.shape[0], SUBLANES, col_ids.shape[1])),
    ]
    return specs, operands


def _segments_overlap(seg_ranges_ref, b, q_blk, kv_blk, num_q_blocks):
    """Whether the segment-id ranges of a query block and a key block can share an id (conservative)."""
    q_lo = seg_ranges_ref[b, 0, q_blk]
    q_hi = seg_ranges_ref[b, 1, q_blk]
    kv_lo = seg_ranges_ref[b, 0, num_q_blocks + kv_blk]
    kv_hi = seg_ranges_ref[b, 1, num_q_blocks + kv_blk]
    return (q_lo <= kv_hi) & (kv_lo <= q_hi) & (kv_hi >= 0)


# ----------------------------------------------------------------------------------------------------------------
# forward


def _fwd_kernel(
    steps_ref,
    seg_ranges_ref,
    q_ref,
    k_ref,
    v_ref,
    mask_ref,
    q_seg_ref,
    kv_seg_ref,
    o_ref,
    lse_ref,
    m_scr,
    l_scr,
    acc_scr,
    *,
    scale,
    groups,
    num_q_blocks,
    precision,
):
    b, n = pl.program_id(0), pl.program_id(1)
    q_blk, kv_blk, _, mask_idx, flags = _decode(steps_ref, n)
    bkv = mask_ref.shape[1]

    @pl.when(jnp.bitwise_and(flags, _FIRST) != 0)
    def _init():
        m_scr[...] = jnp.full_like(m_scr, MASK_VALUE)
        l_scr[...] = jnp.zeros_like(l_scr)
        acc_scr[...] = jnp.zeros_like(acc_scr)

    run = jnp.bitwise_and(flags, _COMPUTE) != 0
    if seg_ranges_ref is not None:
        run = run & _segments_overlap(seg_ranges_ref, b, q_blk, kv_blk, num_q_blocks)

    @pl.when(run)
    def _compute():
        k = k_ref[...]
        v = v_ref[...]
        keep = (mask_ref[...] != 0) | (mask_idx < 0)
        if q_seg_ref is not None:
            keep = keep & (lanes(q_seg_ref[...], bkv) == kv_seg_ref[:1, :])
        for g in range(groups):
            s = jnp.where(keep, dot(q_ref[g], k, NT_DIMS, precision) * scale, MASK_VALUE)
            m_scr[g], l_scr[g], acc_scr[g] = softmax_step_lanes(s, keep, v, m_scr[g], l_scr[g], acc_scr[g], precision)

    @pl.when(jnp.bitwise_and(flags, _LAST) != 0)
    def _finish():
        for g in range(groups):
            out, lse_ref[g] = finish_lanes(acc_scr[g], m_scr[g], l_scr[g])
            o_ref[g] = out.astype(o_ref.dtype)


def forward(q, k, v, tables: BlockTables, segments, *, scale: float, interpret: bool):
    """Block-sparse attention forward on padded operands.

    ``q [B, Hkv, G, Tp, Dp]``, ``k``/``v [B, Hkv, Sp, Dp]`` (``Tp``/``Sp`` multiples of the block sizes, ``Dp`` of
    128); ``segments`` is ``None`` or the dict built by ``segment_operands``. Returns ``out`` shaped like ``q`` and
    the log-sum-exp ``[B, Hkv, G, Tp]`` float32.
    """
    B, Hkv, G, Tp, Dp = q.shape
    bq, bkv = tables.block_q, tables.block_kv
    steps = jnp.asarray(_fwd_steps(tables, Hkv))
    nq = tables.num_q_blocks

    in_specs = [
        pl.BlockSpec((None, None, G, bq, Dp), _row_map),
        pl.BlockSpec((None, None, bkv, Dp), _col_map),
        pl.BlockSpec((None, None, bkv, Dp), _col_map),
        pl.BlockSpec((None, bq, bkv), _mask_map),
    ]
    operands = [q, k, v, jnp.asarray(tables.masks)]
    if segments is not None:
        seg_specs, seg_operands = _segment_inputs(segments["q"], segments["kv"], bq, bkv)
        in_specs += seg_specs
        operands += seg_operands
        prefetch = [steps, segments["ranges"]]
    else:
        prefetch = [steps]

    kernel = functools.partial(
        _kernel_adapter,
        body=_fwd_kernel,
        has_segments=segments is not None,
        num_inputs=4,
        kw=dict(scale=scale, groups=G, num_q_blocks=nq, precision=precision_for(q.dtype)),
    )
    out, lse = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((B, Hkv, G, Tp, LANES), jnp.float32),
        ],
        grid_spec=prefetch_scalar_grid_spec(
            num_scalar_prefetch=len(prefetch),
            grid=(B, steps.shape[1]),
            in_specs=in_specs,
            out_specs=[
                pl.BlockSpec((None, None, G, bq, Dp), _row_map),
                pl.BlockSpec((None, None, G, bq, LANES), _row_map),
            ],
            scratch_shapes=[
                tpu_vmem((G, bq, LANES), jnp.float32),
                tpu_vmem((G, bq, LANES), jnp.float32),
                tpu_vmem((G, bq, Dp), jnp.float32),
            ],
        ),
        compiler_params=tpu_compiler_params(("parallel", "arbitrary")),
        interpret=tpu_interpret_params() if interpret else False,
        name="block_sparse_attention_fwd",
    )(*prefetch, *operands)
    return out, lse[..., 0]


def _kernel_adapter(*refs, body, has_segments, num_inputs, kw):
    """Name the positional refs of a kernel: prefetch, inputs (segment refs ``None`` when absent), outputs, scratch."""
    refs = list(refs)
    steps_ref = refs.pop(0)
    seg_ranges_ref = refs.pop(0) if has_segments else None
    inputs = refs[:num_inputs]
    rest = refs[num_inputs:]
    segs = (rest.pop(0), rest.pop(0)) if has_segments else (None, None)
    return body(steps_ref, seg_ranges_ref, *inputs, *segs, *rest, **kw)


# ----------------------------------------------------------------------------------------------------------------
# backward


def _dq_kernel(
    steps_ref,
    seg_ranges_ref,
    q_ref,
    k_ref,
    v_ref,
    mask_ref,
    do_ref,
    lse_ref,
    delta_ref,
    q_seg_ref,
    kv_seg_ref,
    dq_ref,
    dq_scr,
    *,
    scale,
    groups,
    num_q_blocks,
    precision,
):
    b, n = pl.program_id(0), pl.program_id(1)
    q_blk, kv_blk, _, mask_idx, flags = _decode(steps_ref, n)
    bkv = mask_ref.shape[1]

    @pl.when(jnp.bitwise_and(flags, _FIRST) != 0)
    def _init():
        dq_scr[...] = jnp.zeros_like(dq_scr)

    run = jnp.bitwise_and(flags, _COMPUTE) != 0
    if seg_ranges_ref is not None:
        run = run & _segments_overlap(seg_ranges_ref, b, q_blk, kv_blk, num_q_blocks)

    @pl.when(run)
    def _compute():
        k = k_ref[...]
        v = v_ref[...]
        keep = (mask_ref[...] != 0) | (mask_idx < 0)
        if q_seg_ref is not None:
            keep = keep & (lanes(q_seg_ref[...], bkv) == kv_seg_ref[:1, :])
        for g in range(groups):
            s = dot(q_ref[g], k, NT_DIMS, precision) * scale
            p = jnp.where(keep, jnp.exp(s - lanes(lse_ref[g], bkv)), 0.0)
            dp = dot(do_ref[g], v, NT_DIMS, precision)
            ds = p * (dp - lanes(delta_ref[g], bkv))
            dq_scr[g] = dq_scr[g] + dot(ds.astype(k.dtype), k, NN_DIMS, precision)

    @pl.when(jnp.bitwise_and(flags, _LAST) != 0)
    def _finish():
        dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    steps_ref,
    seg_ranges_ref,
    q_ref,
    k_ref,
    v_ref,
    mask_t_ref,
    do_ref,
    lse_ref,
    delta_ref,
    kv_seg_ref,
    q_seg_ref,
    dk_ref,
    dv_ref,
    dk_scr,
    dv_scr,
    *,
    scale,
    groups,
    num_q_blocks,
    precision,
):
    b, n = pl.program_id(0), pl.program_id(1)
    kv_blk, q_blk, _, mask_idx, flags = _decode(steps_ref, n)
    bq = mask_t_ref.shape[1]

    @pl.when(jnp.bitwise_and(flags, _FIRST) != 0)
    def _init():
        dk_scr[...] = jnp.zeros_like(dk_scr)
        dv_scr[...] = jnp.zeros_like(dv_scr)

    run = jnp.bitwise_and(flags, _COMPUTE) != 0
    if seg_ranges_ref is not None:
        run = run & _segments_overlap(seg_ranges_ref, b, q_blk, kv_blk, num_q_blocks)

    @pl.when(run)
    def _compute():
        k = k_ref[...]
        v = v_ref[...]
        keep_t = (mask_t_ref[...] != 0) | (mask_idx < 0)  # [bkv, bq]
        if kv_seg_ref is not None:
            keep_t = keep_t & (lanes(kv_seg_ref[...], bq) == q_seg_ref[:1, :])
        dk = dk_scr[...]
        dv = dv_scr[...]
        for g in range(groups):
            q = q_ref[g]
            do = do_ref[g]
            s_t = dot(k, q, NT_DIMS, precision) * scale  # [bkv, bq]
            p_t = jnp.where(keep_t, jnp.exp(s_t - lse_ref[g][:1, :]), 0.0)
            dv = dv + dot(p_t.astype(do.dtype), do, NN_DIMS, precision)
            dp_t = dot(v, do, NT_DIMS, precision)
            ds_t = p_t * (dp_t - delta_ref[g][:1, :])
            dk = dk + dot(ds_t.astype(q.dtype), q, NN_DIMS, precision)
        dk_scr[...] = dk
        dv_scr[...] = dv

    @pl.when(jnp.bitwise_and(flags, _LAST) != 0)
    def _finish():
        dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(q, k, v, tables: BlockTables, segments, lse, delta, do, *, scale: float, interpret: bool):
    """Gradients of :func:`forward` on padded operands: ``(dq, dk, dv)``.

    ``lse`` and ``delta`` (``rowsum(dO * O)`` minus any cotangent of the log-sum-exp) are ``[B, Hkv, G, Tp]``
    float32; rows that saw no key must carry ``lse = -inf`` and get zero gradients.
    """
    B, Hkv, G, Tp, Dp = q.shape
    bq, bkv = tables.block_q, tables.block_kv
    nq = tables.num_q_blocks
    interpret_arg = tpu_interpret_params() if interpret else False
    prec = precision_for(q.dtype)
    # rows that saw nothing have lse = -inf; any finite value works there because every key of the row is masked
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)

    # dq: by query block, like the forward
    steps = jnp.asarray(_fwd_steps(tables, Hkv))
    lanes_shape = (B, Hkv, G, Tp, LANES)
    in_specs = [
        pl.BlockSpec((None, None, G, bq, Dp), _row_map),
        pl.BlockSpec((None, None, bkv, Dp), _col_map),
        pl.BlockSpec((None, None, bkv, Dp), _col_map),
        pl.BlockSpec((None, bq, bkv), _mask_map),
        pl.BlockSpec((None, None, G, bq, Dp), _row_map),
        pl.BlockSpec((None, None, G, bq, LANES), _row_map),
        pl.BlockSpec((None, None, G, bq, LANES), _row_map),
    ]
    operands = [
        q,
        k,
        v,
        jnp.asarray(tables.masks),
        do,
        jnp.broadcast_to(lse[..., None], lanes_shape),
        jnp.broadcast_to(delta[..., None], lanes_shape),
    ]
    prefetch = [steps]
    if segments is not None:
        seg_specs, seg_operands = _segment_inputs(segments["q"], segments["kv"], bq, bkv)
        in_specs += seg_specs
        operands += seg_operands
        prefetch.append(segments["ranges"])
    kw = dict(scale=scale, groups=G, num_q_blocks=nq, precision=prec)
    dq = pl.pallas_call(
        functools.partial(_kernel_adapter, body=_dq_kernel, has_segments=segments is not None, num_inputs=7, kw=kw),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid_spec=prefetch_scalar_grid_spec(
            num_scalar_prefetch=len(prefetch),
            grid=(B, steps.shape[1]),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, G, bq, Dp), _row_map),
            scratch_shapes=[tpu_vmem((G, bq, Dp), jnp.float32)],
        ),
        compiler_params=tpu_compiler_params(("parallel", "arbitrary")),
        interpret=interpret_arg,
        name="block_sparse_attention_dq",
    )(*prefetch, *operands)

    # dk / dv: by key block, key-major
    steps_t = jnp.asarray(_bwd_steps(tables, Hkv))

    def q_map_t(b, n, s, *_):
        _, col, h, _, _ = _decode(s, n)
        return b, h, 0, col, 0

    def row_map_t(b, n, s, *_):
        _, col, h, _, _ = _decode(s, n)
        return b, h, 0, 0, col

    def kv_map_t(b, n, s, *_):
        row, _, h, _, _ = _decode(s, n)
        return b, h, row, 0

    rows_shape = (B, Hkv, G, SUBLANES, Tp)
    in_specs = [
        pl.BlockSpec((None, None, G, bq, Dp), q_map_t),
        pl.BlockSpec((None, None, bkv, Dp), kv_map_t),
        pl.BlockSpec((None, None, bkv, Dp), kv_map_t),
        pl.BlockSpec((None, bkv, bq), _mask_map),
        pl.BlockSpec((None, None, G, bq, Dp), q_map_t),
        pl.BlockSpec((None, None, G, SUBLANES, bq), row_map_t),
        pl.BlockSpec((None, None, G, SUBLANES, bq), row_map_t),
    ]
    operands = [
        q,
        k,
        v,
        jnp.asarray(tables.masks_t),
        do,
        jnp.broadcast_to(lse[..., None, :], rows_shape),
        jnp.broadcast_to(delta[..., None, :], rows_shape),
    ]
    prefetch = [steps_t]
    if segments is not None:
        seg_specs, seg_operands = _segment_inputs(segments["kv"], segments["q"], bkv, bq)
        in_specs += seg_specs
        operands += seg_operands
        prefetch.append(segments["ranges"])
    kv_spec = pl.BlockSpec((None, None, bkv, Dp), kv_map_t)
    dk, dv = pl.pallas_call(
        functools.partial(_kernel_adapter, body=_dkv_kernel, has_segments=segments is not None, num_inputs=7, kw=kw),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid_spec=prefetch_scalar_grid_spec(
            num_scalar_prefetch=len(prefetch),
            grid=(B, steps_t.shape[1]),
            in_specs=in_specs,
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[tpu_vmem((bkv, Dp), jnp.float32), tpu_vmem((bkv, Dp), jnp.float32)],
        ),
        compiler_params=tpu_compiler_params(("parallel", "arbitrary")),
        interpret=interpret_arg,
        name="block_sparse_attention_dkv",
    )(*prefetch, *operands)
    return dq, dk, dv


@functools.lru_cache(maxsize=64)
def _fwd_steps(tables: BlockTables, num_heads: int) -> np.ndarray:
    return flatten_steps(tables.kv_count, tables.kv_block, tables.kv_mask, num_heads)


@functools.lru_cache(maxsize=64)
def _bwd_steps(tables: BlockTables, num_heads: int) -> np.ndarray:
    return flatten_steps(tables.q_count, tables.q_block, tables.q_mask, num_heads)
