"""Head patterns compiled into the block tables the block-sparse kernels walk (``qv_jax.kernels.block_tables``).

Each kernel tile is classified analytically from interval bounds (empty, full or undecided); only undecided tiles
are evaluated element by element, and the result is cached per shape, so a model pays for it once.
"""

from __future__ import annotations

import functools

import numpy as np

from qv_jax.attention.patterns import ALL, SOME, HeadPattern, normalize_patterns
from qv_jax.errors import InputError
from qv_jax.kernels.block_tables import EMPTY, FULL, BlockTables, build_block_tables


def _tile_states(pattern: HeadPattern, q_len: int, kv_len: int, block_q: int, block_kv: int, causal: bool, masks):
    """State grid ``[q_blocks, kv_blocks]`` of one pattern; partial tiles' masks go into ``masks`` (deduplicated)."""
    nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
    start = kv_len - q_len
    rows = np.arange(nq)[:, None]
    cols = np.arange(nk)[None, :]
    q0 = start + rows * block_q
    q1 = start + np.minimum((rows + 1) * block_q, q_len) - 1
    k0 = cols * block_kv
    k1 = np.minimum((cols + 1) * block_kv, kv_len) - 1
    tri = pattern.classify(q0, q1, k0, k1, causal=causal, kv_len=kv_len).copy()
    # a tile that spills past the last key needs its padding columns masked
    tri[:, (cols[0] + 1) * block_kv > kv_len] = np.minimum(tri[:, (cols[0] + 1) * block_kv > kv_len], SOME)
    states = np.where(tri == ALL, FULL, EMPTY).astype(np.int32)

    undecided = np.argwhere(tri == SOME)
    offsets = np.arange(block_q)[:, None], np.arange(block_kv)[None, :]
    for chunk in np.array_split(undecided, max(1, -(-len(undecided) // 512))):
        if not len(chunk):
            continue
        i, j = chunk[:, 0], chunk[:, 1]
        t = i[:, None, None] * block_q + offsets[0][None]
        s = j[:, None, None] * block_kv + offsets[1][None]
        tile = pattern.allows(start + t, s, causal=causal) | (t >= q_len)  # padding rows: don't care
        tile &= s < kv_len
        real_rows = (t < q_len)[..., 0]
        n_allowed = (tile & (t < q_len)).sum(axis=(1, 2))
        valid_cols = np.minimum(block_kv, kv_len - j * block_kv)
        full = (n_allowed == real_rows.sum(axis=1) * valid_cols) & ((j + 1) * block_kv <= kv_len)
        states[i[full], j[full]] = FULL
        partial = np.flatnonzero((n_allowed > 0) & ~full)
        if not len(partial):
            continue
        packed = np.packbits(tile[partial].reshape(len(partial), -1), axis=1)
        for n, row in zip(partial, packed, strict=True):
            states[i[n], j[n]] = masks.setdefault(row.tobytes(), (len(masks), tile[n]))[0]
    return states


@functools.lru_cache(maxsize=128)
def compile_block_tables(
    patterns: tuple[HeadPattern, ...], q_len: int, kv_len: int, block_q: int, block_kv: int, causal: bool
) -> BlockTables:
    """Block tables for one pattern per KV head (a single shared row when all heads agree); cached per shape."""
    if q_len < 1 or kv_len < q_len:
        raise InputError(f"need 1 <= T <= S (queries are the last T of S positions); got T={q_len}, S={kv_len}")
    if block_q < 1 or block_kv < 1:
        raise InputError(f"block sizes must be positive, got block_q={block_q}, block_kv={block_kv}")
    for p in patterns:
        p.validate(kv_len)
    distinct = list(dict.fromkeys(patterns))
    masks: dict[bytes, tuple[int, np.ndarray]] = {}
    per_pattern = {p: _tile_states(p, q_len, kv_len, block_q, block_kv, causal, masks) for p in distinct}
    rows = distinct if len(distinct) == 1 else patterns
    states = np.stack([per_pattern[p] for p in rows])
    tiles = np.stack([m for _, m in sorted(masks.values(), key=lambda e: e[0])]) if masks else np.zeros((0,))
    return build_block_tables(
        states, tiles.astype(np.int8), q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv
    )


def block_tables(
    patterns,
    q_len: int,
    kv_len: int,
    *,
    num_kv_heads: int,
    causal: bool = True,
    block_q: int = 128,
    block_kv: int = 128,
) -> BlockTables:
    """The (cached) block tables the kernels run for ``patterns`` (one, or one per KV head) and these shapes."""
    return compile_block_tables(
        normalize_patterns(patterns, num_kv_heads), int(q_len), int(kv_len), int(block_q), int(block_kv), causal
    )


def visited_blocks(
    patterns,
    q_len: int,
    kv_len: int,
    *,
    num_kv_heads: int,
    causal: bool = True,
    block_q: int = 128,
    block_kv: int = 128,
) -> np.ndarray:
    """Tiles (query block x key block) the kernels visit per KV head and batch element, ``[K]`` int64."""
    tables = block_tables(
        patterns, q_len, kv_len, num_kv_heads=num_kv_heads, causal=causal, block_q=block_q, block_kv=block_kv
    )
    return np.broadcast_to(tables.visited_per_head(), (num_kv_heads,)).copy()
