"""The block-sparse kernels' algorithm in plain jnp: an online softmax that walks the same ``BlockTables``.

Each step of a ``lax.scan`` takes the next visited key tile of every query block at once, so the logits alive at a
time are ``[B, N, T, block_kv]`` — never ``[T, S]`` — and the work is proportional to the visited tiles. A step
whose tiles all hold no key a query may see (segment-id ranges that do not meet, as the Pallas kernels skip at run
time) is skipped with ``lax.cond``: an empty cache or memory costs nothing. The backward pass walks the tables by
query block (dq) and by key block (dk, dv), as the kernels do. Operands and results are the padded ones of
``block_sparse_tpu.forward`` (``q [B, K, G, Tp, H]``, ``k`` / ``v [B, K, Sp, H]``, lse ``[B, K, G, Tp]``).
In this file's einsums ``q`` / ``k`` index query / key blocks and ``t`` / ``s`` the rows / columns of a tile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qv_jax.kernels.block_tables import BlockTables


def _by_block(x, blocks: int, axis: int):
    """``x`` with ``axis`` split into ``(blocks, size)``."""
    shape = x.shape
    return x.reshape(*shape[:axis], blocks, shape[axis] // blocks, *shape[axis + 1 :])


def _take_blocks(x, index, axis: int):
    """Blocks ``index [rows, n]`` (rows 1 or the KV heads, on axis 1 of ``x``) of ``x``'s block axis ``axis``."""
    K = x.shape[1]
    index = jnp.broadcast_to(index, (K, index.shape[1]))
    shape = [1] * x.ndim
    shape[1], shape[axis] = K, index.shape[1]
    return jnp.take_along_axis(x, index.reshape(shape), axis=axis)


def _tile_keep(tables: BlockTables, tile_state, count_ok):
    """Element masks ``[rows, n, block_q, block_kv]`` of the tiles ``tile_state [rows, n]`` (-1 full, else a mask
    index), all False where the visit is past its list (``count_ok``)."""
    masks = jnp.asarray(tables.masks) != 0
    partial = masks[jnp.maximum(tile_state, 0)]
    return jnp.where((tile_state < 0)[..., None, None], True, partial) & count_ok[..., None, None]


def _step_needed(tables: BlockTables, segs, count_ok, q_block, kv_block):
    """Whether any tile of a step may hold a visible key: a visit within its list whose query and key blocks'
    segment-id ranges meet (``q_block`` / ``kv_block [rows, n]``, the blocks of each tile)."""
    if segs is None:
        return jnp.any(count_ok)
    ranges = segs["ranges"]  # [B, 2, q_blocks + kv_blocks]: (min, max) id of each query block, then key block
    q_blocks = tables.num_q_blocks
    q_lo, q_hi = ranges[:, 0, :q_blocks][:, q_block], ranges[:, 1, :q_blocks][:, q_block]
    kv_lo, kv_hi = ranges[:, 0, q_blocks:][:, kv_block], ranges[:, 1, q_blocks:][:, kv_block]
    return jnp.any((q_lo <= kv_hi) & (kv_lo <= q_hi) & count_ok[None])


def _segment_keep(segs, q_block_index, kv_block_index, block_q: int, block_kv: int):
    """``[B, rows, n, block_q, block_kv]`` equal-segment masks of the tiles (query block, key block) of a step."""
    q_seg = _by_block(segs["q"], segs["q"].shape[1] // block_q, 1)  # [B, q_blocks, block_q]
    kv_seg = _by_block(segs["kv"], segs["kv"].shape[1] // block_kv, 1)  # [B, kv_blocks, block_kv]
    q_tiles = q_seg[:, q_block_index]  # [B, rows, n, block_q]
    kv_tiles = kv_seg[:, kv_block_index]  # [B, rows, n, block_kv]
    return q_tiles[..., :, None] == kv_tiles[..., None, :]


def _keep(tables, segs, tile_state, count_ok, q_block_index, kv_block_index):
    """``[B | 1, rows, 1, n, block_q, block_kv]``: what a step's tiles may attend to (pattern, list, segments)."""
    keep = _tile_keep(tables, tile_state, count_ok)[None]
    if segs is not None:
        keep = keep & _segment_keep(segs, q_block_index, kv_block_index, tables.block_q, tables.block_kv)
    return keep[:, :, None]


def forward(q, k, v, tables: BlockTables, segs, *, scale: float):
    """Online-softmax attention over the visited tiles; returns ``(out [B, K, G, Tp, H], lse [B, K, G, Tp])``."""
    B, K, G, Tp, H = q.shape
    q_blocks, kv_blocks = tables.num_q_blocks, tables.num_kv_blocks
    q_tiles = _by_block(q, q_blocks, 3).astype(jnp.float32)  # [B, K, G, q_blocks, block_q, H]
    k_tiles = _by_block(k, kv_blocks, 2)  # [B, K, kv_blocks, block_kv, H]
    v_tiles = _by_block(v, kv_blocks, 2)
    rows = jnp.arange(q_blocks)[None, :]
    kv_block = jnp.asarray(tables.kv_block)
    kv_mask = jnp.asarray(tables.kv_mask)
    kv_count = jnp.asarray(tables.kv_count)

    def step(carry, visit):
        def attend(carry):
            m, denom, acc = carry
            index = kv_block[:, :, visit]  # [rows, q_blocks]
            count_ok = visit < kv_count
            keep = _keep(tables, segs, kv_mask[:, :, visit], count_ok, jnp.broadcast_to(rows, index.shape), index)
            kb = _take_blocks(k_tiles, index, 2).astype(jnp.float32)  # [B, K, q_blocks, block_kv, H]
            vb = _take_blocks(v_tiles, index, 2).astype(jnp.float32)
            s = jnp.einsum("BKGqtH,BKqsH->BKGqts", q_tiles, kb) * scale
            s = jnp.where(keep, s, -jnp.inf)
            m_next = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_next), m_next, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(jnp.where(jnp.isfinite(m), m, 0.0) - m_safe) * jnp.isfinite(m)
            denom_next = alpha * denom + jnp.sum(p, axis=-1)
            acc_next = alpha[..., None] * acc + jnp.einsum("BKGqts,BKqsH->BKGqtH", p, vb)
            return m_next, denom_next, acc_next

        index = kv_block[:, :, visit]
        needed = _step_needed(tables, segs, visit < kv_count, jnp.broadcast_to(rows, index.shape), index)
        return jax.lax.cond(needed, attend, lambda c: c, carry), None

    shape = (B, K, G, q_blocks, tables.block_q)
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros((*shape, H), jnp.float32))
    (m, denom, acc), _ = jax.lax.scan(step, init, jnp.arange(tables.max_kv_visits))
    seen = denom > 0
    safe = jnp.where(seen, denom, 1.0)
    out = jnp.where(seen[..., None], acc / safe[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(safe), -jnp.inf)
    return out.reshape(B, K, G, Tp, H).astype(q.dtype), lse.reshape(B, K, G, Tp)


def backward(q, k, v, tables: BlockTables, segs, lse, delta, do, *, scale: float):
    """``(dq, dk, dv)`` from the flash-attention identities, walking the tables by query and by key block.

    ``p = exp(s - lse)``, ``dv = p^T dO``, ``ds = p * (dO v^T - delta)``, ``dq = scale ds k``, ``dk = scale ds^T q``.
    """
    q_blocks, kv_blocks = tables.num_q_blocks, tables.num_kv_blocks
    f32 = jnp.float32
    q_tiles = _by_block(q, q_blocks, 3).astype(f32)
    do_tiles = _by_block(do, q_blocks, 3).astype(f32)
    lse_tiles = _by_block(jnp.where(jnp.isfinite(lse), lse, 0.0), q_blocks, 3)  # [B, K, G, q_blocks, block_q]
    delta_tiles = _by_block(delta, q_blocks, 3)
    k_tiles = _by_block(k, kv_blocks, 2).astype(f32)
    v_tiles = _by_block(v, kv_blocks, 2).astype(f32)

    def probabilities(qb, kb, lse_b, keep):
        s = jnp.einsum("BKGqtH,BKqsH->BKGqts", qb, kb) * scale
        return jnp.where(keep, jnp.exp(s - lse_b[..., None]), 0.0)

    q_rows = jnp.arange(q_blocks)[None, :]
    kv_block, kv_mask, kv_count = (jnp.asarray(a) for a in (tables.kv_block, tables.kv_mask, tables.kv_count))

    def dq_step(dq, visit):
        index = kv_block[:, :, visit]
        q_index = jnp.broadcast_to(q_rows, index.shape)
        count_ok = visit < kv_count

        def accumulate(dq):
            keep = _keep(tables, segs, kv_mask[:, :, visit], count_ok, q_index, index)
            kb, vb = _take_blocks(k_tiles, index, 2), _take_blocks(v_tiles, index, 2)
            p = probabilities(q_tiles, kb, lse_tiles, keep)
            dp = jnp.einsum("BKGqtH,BKqsH->BKGqts", do_tiles, vb)
            ds = p * (dp - delta_tiles[..., None])
            return dq + jnp.einsum("BKGqts,BKqsH->BKGqtH", ds, kb)

        needed = _step_needed(tables, segs, count_ok, q_index, index)
        return jax.lax.cond(needed, accumulate, lambda d: d, dq), None

    dq, _ = jax.lax.scan(dq_step, jnp.zeros(q_tiles.shape, f32), jnp.arange(tables.max_kv_visits))

    kv_rows = jnp.arange(kv_blocks)[None, :]
    q_block, q_mask, q_count = (jnp.asarray(a) for a in (tables.q_block, tables.q_mask, tables.q_count))

    def dkv_step(carry, visit):
        index = q_block[:, :, visit]  # [rows, kv_blocks]: the query block of each key block's visit
        kv_index = jnp.broadcast_to(kv_rows, index.shape)
        count_ok = visit < q_count

        def accumulate(carry):
            dk, dv = carry
            keep = _keep(tables, segs, q_mask[:, :, visit], count_ok, index, kv_index)
            qb = _take_blocks(q_tiles, index, 3)  # [B, K, G, kv_blocks, block_q, H]
            dob = _take_blocks(do_tiles, index, 3)
            lse_b = _take_blocks(lse_tiles, index, 3)
            delta_b = _take_blocks(delta_tiles, index, 3)
            p = probabilities(qb, k_tiles, lse_b, keep)
            dv = dv + jnp.einsum("BKGqts,BKGqtH->BKqsH", p, dob)
            dp = jnp.einsum("BKGqtH,BKqsH->BKGqts", dob, v_tiles)
            ds = p * (dp - delta_b[..., None])
            return dk + jnp.einsum("BKGqts,BKGqtH->BKqsH", ds, qb), dv

        needed = _step_needed(tables, segs, count_ok, index, kv_index)
        return jax.lax.cond(needed, accumulate, lambda c: c, carry), None

    zeros = jnp.zeros(k_tiles.shape, f32)
    (dk, dv), _ = jax.lax.scan(dkv_step, (zeros, zeros), jnp.arange(tables.max_q_visits))
    dq = (dq * scale).reshape(q.shape).astype(q.dtype)
    return dq, (dk * scale).reshape(k.shape).astype(k.dtype), dv.reshape(v.shape).astype(v.dtype)
