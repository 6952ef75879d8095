"""The block-sparse kernels' algorithm in plain jnp: an online softmax that walks the same ``BlockTables``.

The visited tiles of all rows (a KV head and a query block) are laid out on the host into a schedule of ``steps x
width`` tiles, ``steps`` the longest row's visit count: tile ``i`` of the row-major list goes to step ``i mod
steps``, so a row's tiles fall in distinct steps (the online softmax does not care in which order a row's tiles
come) and every step is full but the last slots. A ``lax.scan`` step gathers its tiles' queries, keys and running
state, computes them at once and scatters the state back: the logits alive at a time are ``[width, B, G,
block_q, block_kv]`` — never ``[T, S]`` — and the work is the visited tiles, not the longest row times the rows
(a streaming head costs its own tiles). A step whose tiles can hold no visible key (segment-id ranges that do not
meet, as the Pallas kernels skip at run time) is skipped with ``lax.cond``: an empty cache or memory costs nothing.
The backward pass schedules the same way by query block (dq) and by key block (dk, dv).

Operands and results are the padded ones of ``block_sparse_tpu.forward`` (``q [B, K, G, Tp, H]``, ``k`` / ``v
[B, K, Sp, H]``, lse ``[B, K, G, Tp]``). Here ``W`` indexes the tiles of a step, ``t`` / ``s`` the rows / columns
of a tile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qv_jax.kernels.block_tables import BlockTables


@dataclasses.dataclass(frozen=True)
class Schedule:
    """``[steps, width]`` tiles: the KV head, the row's block, the visited block and its mask state of each; a
    padding slot points at the dummy row ``rows`` (one past the last block) and is never visible."""

    head: np.ndarray
    row: np.ndarray
    other: np.ndarray
    state: np.ndarray
    valid: np.ndarray


def schedule(count: np.ndarray, block: np.ndarray, mask: np.ndarray, num_kv_heads: int) -> Schedule:
    """The schedule of the visit lists ``block`` / ``mask [rows, blocks, visits]`` of lengths ``count``; tables
    shared by all heads (one table row) are repeated for each KV head."""
    count, block, mask = (np.broadcast_to(a, (num_kv_heads, *a.shape[1:])) for a in (count, block, mask))
    head, row, visit = np.nonzero(np.arange(block.shape[2])[None, None, :] < count[..., None])  # row-major
    steps = max(1, int(count.max(initial=0)))
    width = max(1, -(-head.size // steps))
    placed = np.arange(head.size)
    at = (placed % steps, placed // steps)

    def laid_out(values: np.ndarray, fill: int) -> np.ndarray:
        out = np.full((steps, width), fill, np.int32)
        out[at] = values
        return out

    return Schedule(
        head=laid_out(head, 0),
        row=laid_out(row, block.shape[1]),
        other=laid_out(block[head, row, visit], 0),
        state=laid_out(mask[head, row, visit], -1),
        valid=laid_out(np.ones(head.size, np.int32), 0).astype(bool),
    )


def _tiles(x, blocks: int, axis: int):
    """``x`` with ``axis`` split into ``(blocks, size)`` and the KV-head and block axes moved to the front."""
    shape = x.shape
    x = x.reshape(*shape[:axis], blocks, shape[axis] // blocks, *shape[axis + 1 :])
    return jnp.moveaxis(x, (1, axis), (0, 1))


def _untiled(x, axis: int):
    """The inverse of :func:`_tiles` (without a dummy row)."""
    x = jnp.moveaxis(x, (0, 1), (1, axis))
    return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])


def _visible(tables: BlockTables, segs, state, valid, q_index, kv_index):
    """``[W, B | 1, 1, block_q, block_kv]``: which elements of a step's tiles a query may see."""
    masks = jnp.asarray(tables.masks) != 0
    keep = jnp.where((state < 0)[:, None, None], True, masks[jnp.maximum(state, 0)]) & valid[:, None, None]
    keep = keep[:, None]
    if segs is not None:
        q_seg = segs["q"].reshape(segs["q"].shape[0], -1, tables.block_q)[
            :, jnp.minimum(q_index, tables.num_q_blocks - 1)
        ]
        kv_seg = segs["kv"].reshape(segs["kv"].shape[0], -1, tables.block_kv)[:, kv_index]
        keep = keep & (q_seg[..., :, None] == kv_seg[..., None, :]).swapaxes(0, 1)  # [W, B, block_q, block_kv]
    return keep[:, :, None]


def _needed(tables: BlockTables, segs, valid, q_index, kv_index):
    """Whether a step's tiles may hold a visible key: a real tile whose blocks' segment-id ranges meet."""
    if segs is None:
        return jnp.any(valid)
    ranges, q_blocks = segs["ranges"], tables.num_q_blocks  # [B, 2, q_blocks + kv_blocks]: (min, max) per block
    q_index = jnp.minimum(q_index, q_blocks - 1)
    q_lo, q_hi = ranges[:, 0, q_index], ranges[:, 1, q_index]
    kv_lo, kv_hi = ranges[:, 0, q_blocks + kv_index], ranges[:, 1, q_blocks + kv_index]
    return jnp.any((q_lo <= kv_hi) & (kv_lo <= q_hi) & valid[None])


def _scan(body, carry, plan: Schedule):
    xs = tuple(jnp.asarray(a) for a in (plan.head, plan.row, plan.other, plan.state, plan.valid))
    return jax.lax.scan(body, carry, xs)[0]


def _with_dummy(x):
    """``x`` with one more, zero, block on axis 1: the row padding slots write to."""
    return jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)


def forward(q, k, v, tables: BlockTables, segs, *, scale: float):
    """Online-softmax attention over the visited tiles; returns ``(out [B, K, G, Tp, H], lse [B, K, G, Tp])``."""
    B, K, G, _, H = q.shape
    q_tiles = _tiles(q, tables.num_q_blocks, 3).astype(jnp.float32)  # [K, q_blocks, B, G, block_q, H]
    k_tiles = _tiles(k, tables.num_kv_blocks, 2)  # [K, kv_blocks, B, block_kv, H]
    v_tiles = _tiles(v, tables.num_kv_blocks, 2)
    plan = schedule(tables.kv_count, tables.kv_block, tables.kv_mask, K)

    def step(carry, tile):
        head, row, kv, state, valid = tile

        def attend(carry):
            m, denom, acc = carry
            qb = q_tiles[head, jnp.minimum(row, tables.num_q_blocks - 1)]  # [W, B, G, block_q, H]
            kb, vb = k_tiles[head, kv].astype(jnp.float32), v_tiles[head, kv].astype(jnp.float32)
            s = jnp.einsum("WBGtH,WBsH->WBGts", qb, kb) * scale
            s = jnp.where(_visible(tables, segs, state, valid, row, kv), s, -jnp.inf)
            m_old, denom_old, acc_old = m[head, row], denom[head, row], acc[head, row]
            m_new = jnp.maximum(m_old, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(jnp.where(jnp.isfinite(m_old), m_old, 0.0) - m_safe) * jnp.isfinite(m_old)
            denom_new = alpha * denom_old + jnp.sum(p, axis=-1)
            acc_new = alpha[..., None] * acc_old + jnp.einsum("WBGts,WBsH->WBGtH", p, vb)
            return (
                m.at[head, row].set(m_new),
                denom.at[head, row].set(denom_new),
                acc.at[head, row].set(acc_new),
            )

        return jax.lax.cond(_needed(tables, segs, valid, row, kv), attend, lambda c: c, carry), None

    shape = (K, tables.num_q_blocks + 1, B, G, tables.block_q)
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros((*shape, H), jnp.float32))
    m, denom, acc = (x[:, :-1] for x in _scan(step, init, plan))
    seen = denom > 0
    safe = jnp.where(seen, denom, 1.0)
    out = jnp.where(seen[..., None], acc / safe[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(safe), -jnp.inf)
    return _untiled(out, 3).astype(q.dtype), _untiled(lse, 3)


def backward(q, k, v, tables: BlockTables, segs, lse, delta, do, *, scale: float):
    """``(dq, dk, dv)`` from the flash-attention identities, scheduled by query block and by key block.

    ``p = exp(s - lse)``, ``dv = p^T dO``, ``ds = p * (dO v^T - delta)``, ``dq = scale ds k``, ``dk = scale ds^T q``.
    """
    K = q.shape[1]
    nq, nkv = tables.num_q_blocks, tables.num_kv_blocks
    f32 = jnp.float32
    q_tiles = _tiles(q, nq, 3).astype(f32)  # [K, q_blocks, B, G, block_q, H]
    do_tiles = _tiles(do, nq, 3).astype(f32)
    lse_tiles = _tiles(jnp.where(jnp.isfinite(lse), lse, 0.0), nq, 3)  # [K, q_blocks, B, G, block_q]
    delta_tiles = _tiles(delta, nq, 3)
    k_tiles = _tiles(k, nkv, 2).astype(f32)  # [K, kv_blocks, B, block_kv, H]
    v_tiles = _tiles(v, nkv, 2).astype(f32)

    def terms(head, q_block, kv_block, state, valid):
        """Per tile: ``p``, ``ds`` ``[W, B, G, block_q, block_kv]`` and the tile's operands."""
        qb, dob = q_tiles[head, q_block], do_tiles[head, q_block]
        kb, vb = k_tiles[head, kv_block], v_tiles[head, kv_block]
        s = jnp.einsum("WBGtH,WBsH->WBGts", qb, kb) * scale
        visible = _visible(tables, segs, state, valid, q_block, kv_block)
        p = jnp.where(visible, jnp.exp(s - lse_tiles[head, q_block][..., None]), 0.0)
        dp = jnp.einsum("WBGtH,WBsH->WBGts", dob, vb)
        return p, p * (dp - delta_tiles[head, q_block][..., None]), qb, dob, kb

    def dq_step(dq, tile):
        head, row, kv, state, valid = tile

        def accumulate(dq):
            _, ds, _, _, kb = terms(head, jnp.minimum(row, nq - 1), kv, state, valid)
            return dq.at[head, row].add(jnp.einsum("WBGts,WBsH->WBGtH", ds, kb))

        return jax.lax.cond(_needed(tables, segs, valid, row, kv), accumulate, lambda d: d, dq), None

    dq = _scan(
        dq_step, _with_dummy(jnp.zeros_like(q_tiles)), schedule(tables.kv_count, tables.kv_block, tables.kv_mask, K)
    )

    def dkv_step(carry, tile):
        head, row, qi, state, valid = tile  # row: the key block; qi: the query block it is visited by

        def accumulate(carry):
            dk, dv = carry
            p, ds, qb, dob, _ = terms(head, qi, jnp.minimum(row, nkv - 1), state, valid)
            return (
                dk.at[head, row].add(jnp.einsum("WBGts,WBGtH->WBsH", ds, qb)),
                dv.at[head, row].add(jnp.einsum("WBGts,WBGtH->WBsH", p, dob)),
            )

        return jax.lax.cond(_needed(tables, segs, valid, qi, row), accumulate, lambda c: c, carry), None

    zeros = _with_dummy(jnp.zeros_like(k_tiles))
    dk, dv = _scan(dkv_step, (zeros, zeros), schedule(tables.q_count, tables.q_block, tables.q_mask, K))
    dq = _untiled(dq[:, :-1] * scale, 3).astype(q.dtype)
    return dq, _untiled(dk[:, :-1] * scale, 2).astype(k.dtype), _untiled(dv[:, :-1], 2).astype(v.dtype)
