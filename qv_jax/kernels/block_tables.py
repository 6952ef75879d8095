"""Block tables: the precomputed visit lists that drive the block-sparse attention kernels.

A head pattern (``qv_jax.attention.patterns``) is compiled on the host into a grid of ``block_q x block_kv`` tiles,
each *empty* (never visited), *full* (every query of the tile sees every key) or *partial* (an element mask, stored
once per distinct mask in ``masks``). The kernels read two views of the grid: by query block (forward, dq) and by key
block (dk / dv). Tables have ``rows``: one per KV head, or a single row when every head shares one pattern.
See docs/attention.md, "How the kernels skip work".
"""

from __future__ import annotations

import dataclasses

import numpy as np

EMPTY = -2
FULL = -1


@dataclasses.dataclass(frozen=True, eq=False)
class BlockTables:
    """Visit lists of a block-sparse attention, by query block and by key block (numpy, int32 / int8).

    ``kv_block[row, i, :kv_count[row, i]]`` are the key blocks query block ``i`` visits, in increasing order, and
    ``kv_mask`` says for each one ``FULL`` or the index of its element mask; ``q_block`` / ``q_mask`` / ``q_count``
    are the same by key block. Entries past the count repeat the last real entry, so a pipelined kernel that runs a
    fixed number of steps asks for the same block again (no new copy) and skips the compute.

    ``masks`` are 1 where a query attends to a key, ``masks_t`` their transposes (the dk / dv kernels compute
    key-major). Query rows past ``q_len`` (block padding) are don't-care and set to 1; key columns past ``kv_len`` are
    0, so padding never needs a mask of its own.

    Compared and hashed by identity: build it once per shape (the pattern compiler caches it) and pass the same
    object to jitted functions as a static argument.
    """

    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    kv_block: np.ndarray  # [rows, q_blocks, kv_visits] int32
    kv_mask: np.ndarray  # [rows, q_blocks, kv_visits] int32, FULL or mask index
    kv_count: np.ndarray  # [rows, q_blocks] int32
    q_block: np.ndarray  # [rows, kv_blocks, q_visits] int32
    q_mask: np.ndarray  # [rows, kv_blocks, q_visits] int32
    q_count: np.ndarray  # [rows, kv_blocks] int32
    masks: np.ndarray  # [masks, block_q, block_kv] int8
    masks_t: np.ndarray  # [masks, block_kv, block_q] int8

    @property
    def num_heads(self) -> int:
        """Rows of the tables: the number of KV heads, or 1 when every head shares one pattern."""
        return self.kv_count.shape[0]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_count.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return self.q_count.shape[1]

    @property
    def max_kv_visits(self) -> int:
        return self.kv_block.shape[2]

    @property
    def max_q_visits(self) -> int:
        return self.q_block.shape[2]

    def visited_per_head(self) -> np.ndarray:
        """Tiles visited for each table row, ``[rows]`` int64."""
        return self.kv_count.sum(axis=1, dtype=np.int64)

    def tile_states(self) -> np.ndarray:
        """The ``[rows, q_blocks, kv_blocks]`` state grid the tables were built from (``EMPTY``, ``FULL`` or a mask
        index)."""
        states = np.full((self.num_heads, self.num_q_blocks, self.num_kv_blocks), EMPTY, np.int32)
        for row in range(self.num_heads):
            for i in range(self.num_q_blocks):
                count = self.kv_count[row, i]
                states[row, i, self.kv_block[row, i, :count]] = self.kv_mask[row, i, :count]
        return states

    def element_mask(self) -> np.ndarray:
        """The ``[rows, q_len, kv_len]`` boolean mask the tables encode (for tests and the jnp reference)."""
        states = self.tile_states()
        rows, q_blocks, kv_blocks = states.shape
        bq, bkv = self.block_q, self.block_kv
        out = np.zeros((rows, q_blocks * bq, kv_blocks * bkv), bool)
        for row, i, j in zip(*np.nonzero(states != EMPTY), strict=True):
            s = states[row, i, j]
            out[row, i * bq : (i + 1) * bq, j * bkv : (j + 1) * bkv] = True if s == FULL else self.masks[s] != 0
        out[:, :, self.kv_len :] = False
        return out[:, : self.q_len, : self.kv_len]


def _visit_lists(states: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compact the last axis of ``states [rows, blocks, other_blocks]`` into (visited block ids, their states,
    count), each list padded by repeating its last entry."""
    visited = states != EMPTY
    count = visited.sum(axis=2).astype(np.int32)
    width = max(int(count.max(initial=0)), 1)
    # stable sort puts the visited blocks first, in increasing order
    order = np.argsort(~visited, axis=2, kind="stable")[:, :, :width].astype(np.int32)
    pad = np.arange(width)[None, None, :] >= count[:, :, None]
    last = np.take_along_axis(order, np.maximum(count - 1, 0)[:, :, None], axis=2)
    ids = np.where(pad, last, order).astype(np.int32)
    # a list with nothing to visit points at block 0; its count of 0 keeps the kernels from computing
    ids = np.where(count[:, :, None] == 0, 0, ids).astype(np.int32)
    tile_state = np.take_along_axis(states, ids, axis=2).astype(np.int32)
    tile_state = np.where(tile_state == EMPTY, FULL, tile_state).astype(np.int32)
    return ids, tile_state, count


def build_block_tables(
    states: np.ndarray, masks: np.ndarray, *, q_len: int, kv_len: int, block_q: int, block_kv: int
) -> BlockTables:
    """Tables from a tile state grid ``[rows, q_blocks, kv_blocks]``: ``EMPTY``, ``FULL`` or an index into
    ``masks [masks, block_q, block_kv]``."""
    states = np.asarray(states, np.int32)
    q_blocks, kv_blocks = states.shape[1:]
    if q_blocks != -(-q_len // block_q) or kv_blocks != -(-kv_len // block_kv):
        raise ValueError(f"state grid {states.shape} does not tile q_len={q_len} / kv_len={kv_len}")
    masks = np.asarray(masks, np.int8).reshape(-1, block_q, block_kv)
    if masks.shape[0] == 0:  # kernels always take a mask operand; give them one tile they never read
        masks = np.zeros((1, block_q, block_kv), np.int8)
    kv_block, kv_mask, kv_count = _visit_lists(states)
    q_block, q_mask, q_count = _visit_lists(states.transpose(0, 2, 1))
    return BlockTables(
        q_len=q_len,
        kv_len=kv_len,
        block_q=block_q,
        block_kv=block_kv,
        kv_block=kv_block,
        kv_mask=kv_mask,
        kv_count=kv_count,
        q_block=q_block,
        q_mask=q_mask,
        q_count=q_count,
        masks=np.ascontiguousarray(masks),
        masks_t=np.ascontiguousarray(masks.transpose(0, 2, 1)),
    )
