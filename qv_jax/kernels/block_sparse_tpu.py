"""Block-sparse flash attention for TPU (Mosaic): forward, dq and dk/dv kernels driven by ``BlockTables``.

Grid ``(batch, step)``: the visit lists of every (KV head, query block), or (KV head, key block) for dk/dv, are
flattened into one step list scalar-prefetched into SMEM, so a streaming head costs only its visited tiles, and a
list's output block stays in VMEM while the list accumulates. A step runs the ``G`` query heads of its KV group
against one key / value tile (q / out tiles ``[G, block_q, Hp]``). Per-query statistics are lane-replicated
``[block_q, 128]``; the key-major dk/dv kernel (``s^T = k q^T``) takes them as sublane rows ``[8, block_q]``.
Operands come padded from ``kernels.block_sparse``; see docs/attention.md, "How the kernels skip work".
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

# a step is two int32 words: (block << 16 | visited block) and (kv_head << 24 | flags << 21 | mask_index + 1)
_FIRST, _LAST, _COMPUTE = 1, 2, 4
_BLOCK_BITS, _MASK_BITS = 16, 21


def flatten_steps(count: np.ndarray, blocks: np.ndarray, masks: np.ndarray, num_kv_heads: int) -> np.ndarray:
    """Pack visit lists ``[rows, blocks, visits]`` (rows = 1 or ``num_kv_heads``) into ``[2, steps]`` int32 step
    words, KV-head-major."""
    lists = []
    for head in range(num_kv_heads):
        row = head if count.shape[0] > 1 else 0
        for block in range(count.shape[1]):
            num_visits = int(count[row, block])
            visits = max(num_visits, 1)  # a list that visits nothing still writes its (zero) output
            blk = blocks[row, block, :visits].astype(np.int64)
            msk = masks[row, block, :visits].astype(np.int64)
            flags = np.zeros(visits, np.int64)
            flags[0] |= _FIRST
            flags[-1] |= _LAST
            if num_visits:
                flags |= _COMPUTE
            lists.append((np.full(visits, block), blk, np.full(visits, head), flags, msk))
    own, blk, head, flags, msk = (np.concatenate(x) for x in zip(*lists, strict=True))
    if max(own.max(), blk.max()) >= 1 << _BLOCK_BITS or msk.max() + 1 >= 1 << _MASK_BITS or head.max() >= 1 << 7:
        raise ValueError("block tables too large to pack into step words")
    word0 = (own << _BLOCK_BITS) | blk
    word1 = (head << 24) | (flags << _MASK_BITS) | (msk + 1)
    return np.stack([word0, word1]).astype(np.int32)


def _decode(steps_ref, step):
    """(block whose list it walks, visited block, KV head, mask index, flags) of ``step``."""
    w0 = steps_ref[0, step]
    w1 = steps_ref[1, step]
    own = lax.shift_right_logical(w0, _BLOCK_BITS)
    visited = jnp.bitwise_and(w0, (1 << _BLOCK_BITS) - 1)
    head = lax.shift_right_logical(w1, 24)
    flags = jnp.bitwise_and(lax.shift_right_logical(w1, _MASK_BITS), 7)
    mask = jnp.bitwise_and(w1, (1 << _MASK_BITS) - 1) - 1
    return own, visited, head, mask, flags


def _q_map(b, step, steps_ref, *_):
    """Block index of the step's query block in a ``[B, K, G, Tp, ...]`` operand (q, dO, outputs, per-query
    statistics)."""
    q_blk, _, head, _, _ = _decode(steps_ref, step)
    return b, head, 0, q_blk, 0


def _kv_map(b, step, steps_ref, *_):
    """Block index of the step's key block in a ``[B, K, Sp, Hp]`` operand (k, v)."""
    _, kv_blk, head, _, _ = _decode(steps_ref, step)
    return b, head, kv_blk, 0


def _mask_map(b, step, steps_ref, *_):
    """The step's element mask (any one for a full tile, which never reads it)."""
    return jnp.maximum(_decode(steps_ref, step)[3], 0), 0, 0


def _segment_inputs(own_ids, visited_ids, own_block: int, visited_block: int) -> tuple[list, list]:
    """Block specs and operands for the segment ids (``[B, Tp]`` / ``[B, Sp]``) of the step's own block,
    lane-replicated ``[own_block, 128]``, and of its visited block, sublane-replicated ``[8, visited_block]`` (whole
    vregs for the equality test)."""
    specs = [
        pl.BlockSpec((None, own_block, LANES), lambda b, step, s, *_: (b, _decode(s, step)[0], 0)),
        pl.BlockSpec((None, SUBLANES, visited_block), lambda b, step, s, *_: (b, 0, _decode(s, step)[1])),
    ]
    operands = [
        jnp.broadcast_to(own_ids[:, :, None], (*own_ids.shape, LANES)),
        jnp.broadcast_to(visited_ids[:, None, :], (visited_ids.shape[0], SUBLANES, visited_ids.shape[1])),
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
    b, step = pl.program_id(0), pl.program_id(1)
    q_blk, kv_blk, _, mask_idx, flags = _decode(steps_ref, step)
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

    ``q [B, K, G, Tp, Hp]``, ``k``/``v [B, K, Sp, Hp]`` (``Tp``/``Sp`` multiples of the block sizes, ``Hp`` of
    128); ``segments`` is ``None`` or the dict built by ``segment_operands``. Returns ``out`` shaped like ``q`` and
    the log-sum-exp ``[B, K, G, Tp]`` float32.
    """
    B, K, G, Tp, Hp = q.shape
    bq, bkv = tables.block_q, tables.block_kv
    steps = jnp.asarray(_fwd_steps(tables, K))
    q_blocks = tables.num_q_blocks

    in_specs = [
        pl.BlockSpec((None, None, G, bq, Hp), _q_map),
        pl.BlockSpec((None, None, bkv, Hp), _kv_map),
        pl.BlockSpec((None, None, bkv, Hp), _kv_map),
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
        kw=dict(scale=scale, groups=G, num_q_blocks=q_blocks, precision=precision_for(q.dtype)),
    )
    out, lse = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((B, K, G, Tp, LANES), jnp.float32),
        ],
        grid_spec=prefetch_scalar_grid_spec(
            num_scalar_prefetch=len(prefetch),
            grid=(B, steps.shape[1]),
            in_specs=in_specs,
            out_specs=[
                pl.BlockSpec((None, None, G, bq, Hp), _q_map),
                pl.BlockSpec((None, None, G, bq, LANES), _q_map),
            ],
            scratch_shapes=[
                tpu_vmem((G, bq, LANES), jnp.float32),
                tpu_vmem((G, bq, LANES), jnp.float32),
                tpu_vmem((G, bq, Hp), jnp.float32),
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
    b, step = pl.program_id(0), pl.program_id(1)
    q_blk, kv_blk, _, mask_idx, flags = _decode(steps_ref, step)
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
    b, step = pl.program_id(0), pl.program_id(1)
    kv_blk, q_blk, _, mask_idx, flags = _decode(steps_ref, step)
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

    ``lse`` and ``delta`` (``rowsum(dO * O)`` minus any cotangent of the log-sum-exp) are ``[B, K, G, Tp]``
    float32; rows that saw no key must carry ``lse = -inf`` and get zero gradients.
    """
    B, K, G, Tp, Hp = q.shape
    bq, bkv = tables.block_q, tables.block_kv
    q_blocks = tables.num_q_blocks
    interpret_arg = tpu_interpret_params() if interpret else False
    prec = precision_for(q.dtype)
    # rows that saw nothing have lse = -inf; any finite value works there because every key of the row is masked
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)

    # dq: by query block, like the forward
    steps = jnp.asarray(_fwd_steps(tables, K))
    lanes_shape = (B, K, G, Tp, LANES)
    in_specs = [
        pl.BlockSpec((None, None, G, bq, Hp), _q_map),
        pl.BlockSpec((None, None, bkv, Hp), _kv_map),
        pl.BlockSpec((None, None, bkv, Hp), _kv_map),
        pl.BlockSpec((None, bq, bkv), _mask_map),
        pl.BlockSpec((None, None, G, bq, Hp), _q_map),
        pl.BlockSpec((None, None, G, bq, LANES), _q_map),
        pl.BlockSpec((None, None, G, bq, LANES), _q_map),
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
    kw = dict(scale=scale, groups=G, num_q_blocks=q_blocks, precision=prec)
    dq = pl.pallas_call(
        functools.partial(_kernel_adapter, body=_dq_kernel, has_segments=segments is not None, num_inputs=7, kw=kw),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid_spec=prefetch_scalar_grid_spec(
            num_scalar_prefetch=len(prefetch),
            grid=(B, steps.shape[1]),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, G, bq, Hp), _q_map),
            scratch_shapes=[tpu_vmem((G, bq, Hp), jnp.float32)],
        ),
        compiler_params=tpu_compiler_params(("parallel", "arbitrary")),
        interpret=interpret_arg,
        name="block_sparse_attention_dq",
    )(*prefetch, *operands)

    # dk / dv: by key block, key-major
    steps_t = jnp.asarray(_bwd_steps(tables, K))

    def q_map_t(b, step, s, *_):
        _, q_blk, head, _, _ = _decode(s, step)
        return b, head, 0, q_blk, 0

    def stats_map_t(b, step, s, *_):
        _, q_blk, head, _, _ = _decode(s, step)
        return b, head, 0, 0, q_blk

    def kv_map_t(b, step, s, *_):
        kv_blk, _, head, _, _ = _decode(s, step)
        return b, head, kv_blk, 0

    sublanes_shape = (B, K, G, SUBLANES, Tp)
    in_specs = [
        pl.BlockSpec((None, None, G, bq, Hp), q_map_t),
        pl.BlockSpec((None, None, bkv, Hp), kv_map_t),
        pl.BlockSpec((None, None, bkv, Hp), kv_map_t),
        pl.BlockSpec((None, bkv, bq), _mask_map),
        pl.BlockSpec((None, None, G, bq, Hp), q_map_t),
        pl.BlockSpec((None, None, G, SUBLANES, bq), stats_map_t),
        pl.BlockSpec((None, None, G, SUBLANES, bq), stats_map_t),
    ]
    operands = [
        q,
        k,
        v,
        jnp.asarray(tables.masks_t),
        do,
        jnp.broadcast_to(lse[..., None, :], sublanes_shape),
        jnp.broadcast_to(delta[..., None, :], sublanes_shape),
    ]
    prefetch = [steps_t]
    if segments is not None:
        seg_specs, seg_operands = _segment_inputs(segments["kv"], segments["q"], bkv, bq)
        in_specs += seg_specs
        operands += seg_operands
        prefetch.append(segments["ranges"])
    kv_spec = pl.BlockSpec((None, None, bkv, Hp), kv_map_t)
    dk, dv = pl.pallas_call(
        functools.partial(_kernel_adapter, body=_dkv_kernel, has_segments=segments is not None, num_inputs=7, kw=kw),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid_spec=prefetch_scalar_grid_spec(
            num_scalar_prefetch=len(prefetch),
            grid=(B, steps_t.shape[1]),
            in_specs=in_specs,
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[tpu_vmem((bkv, Hp), jnp.float32), tpu_vmem((bkv, Hp), jnp.float32)],
        ),
        compiler_params=tpu_compiler_params(("parallel", "arbitrary")),
        interpret=interpret_arg,
        name="block_sparse_attention_dkv",
    )(*prefetch, *operands)
    return dq, dk, dv


@functools.lru_cache(maxsize=64)
def _fwd_steps(tables: BlockTables, num_kv_heads: int) -> np.ndarray:
    return flatten_steps(tables.kv_count, tables.kv_block, tables.kv_mask, num_kv_heads)


@functools.lru_cache(maxsize=64)
def _bwd_steps(tables: BlockTables, num_kv_heads: int) -> np.ndarray:
    return flatten_steps(tables.q_count, tables.q_block, tables.q_mask, num_kv_heads)
