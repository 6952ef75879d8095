"""Declarative attention patterns, one per KV head, and their compilation into block tables.

A :class:`HeadPattern` says which keys a query may see, as a function of the two positions only (data-dependent
restrictions, i.e. segment ids, are applied on top by the kernels). Positions follow the bottom-right convention of
``qv_jax.attention.dense``: the ``T`` queries are the last ``T`` of the ``S`` key positions, query ``t`` sitting at
position ``S - T + t``. With ``causal`` a query never sees a later key; without it (vision) windows are symmetric.

- ``dense()``: every key (the causal triangle when causal).
- ``streaming(sink, local)`` (DuoAttention / LServe streaming heads): the first ``sink`` keys and the ``local``
  nearest ones, ``q - k < local`` (``|q - k| < local`` when not causal).
- ``strided(local_blocks, vert_stride, offset, block)`` (LongGen / S2-attention): in units of ``block`` tokens, the
  ``local_blocks`` nearest key blocks (the query's own included) plus every key block ``kb`` with
  ``kb % vert_stride == offset``; different ``offset`` per head spreads the strided blocks over the heads.
- ``from_block_mask(mask, block)``: any boolean ``mask[qb, kb]`` over absolute ``block``-token blocks.

:func:`compile_block_tables` turns patterns plus shapes into :class:`~qv_jax.kernels.block_tables.BlockTables`. It
classifies each kernel tile analytically (empty, full, or undecided from interval bounds), evaluates the element
mask only on undecided tiles, and caches the result, so a model pays for it once per shape.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from qv_jax.errors import InputError
from qv_jax.kernels.block_tables import EMPTY, FULL, BlockTables, build_block_tables

# three-valued tile classification; AND is min, OR is max
_NONE, _SOME, _ALL = 0, 1, 2


class BlockMask:
    """A read-only boolean ``[rows, cols]`` grid that hashes and compares by value (for frozen patterns)."""

    __slots__ = ("_bits", "_hash")

    def __init__(self, mask):
        bits = np.array(mask, dtype=bool)
        if bits.ndim != 2 or 0 in bits.shape:
            raise InputError(f"block mask must be a non-empty 2-D boolean array, got shape {bits.shape}")
        bits.setflags(write=False)
        self._bits = bits
        self._hash = hash((bits.shape, np.packbits(bits).tobytes()))

    @property
    def array(self) -> np.ndarray:
        return self._bits

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, BlockMask) and np.array_equal(self._bits, other._bits)

    def __repr__(self) -> str:
        return f"BlockMask(shape={self._bits.shape}, density={self._bits.mean():.3f})"


@dataclasses.dataclass(frozen=True)
class HeadPattern:
    """What one KV head (and the query heads of its group) attends to. Build with the class methods."""

    kind: str
    sink: int = 0
    local: int = 0
    local_blocks: int = 0
    vert_stride: int = 0
    offset: int = 0
    block: int = 0
    mask: BlockMask | None = None

    @classmethod
    def dense(cls) -> HeadPattern:
        return cls("dense")

    @classmethod
    def streaming(cls, sink: int, local: int) -> HeadPattern:
        if sink < 0 or local < 1:
            raise InputError(f"streaming pattern needs sink >= 0 and local >= 1, got sink={sink}, local={local}")
        return cls("streaming", sink=int(sink), local=int(local))

    @classmethod
    def strided(cls, local_blocks: int, vert_stride: int, offset: int = 0, block: int = 128) -> HeadPattern:
        if local_blocks < 1 or vert_stride < 1 or block < 1 or not 0 <= offset < vert_stride:
            raise InputError(
                "strided pattern needs local_blocks >= 1, vert_stride >= 1, block >= 1 and 0 <= offset < "
                f"vert_stride; got local_blocks={local_blocks}, vert_stride={vert_stride}, offset={offset}, "
                f"block={block}"
            )
        return cls(
            "strided", local_blocks=int(local_blocks), vert_stride=int(vert_stride), offset=int(offset), block=block
        )

    @classmethod
    def from_block_mask(cls, mask, block: int) -> HeadPattern:
        if block < 1:
            raise InputError(f"block mask pattern needs block >= 1, got {block}")
        return cls("block_mask", block=int(block), mask=mask if isinstance(mask, BlockMask) else BlockMask(mask))

    @property
    def is_dense(self) -> bool:
        return self.kind == "dense"

    # -- element level ---------------------------------------------------------------------------------------

    def allows(self, q_pos, k_pos, *, causal: bool, xp=np):
        """Boolean array, broadcast from integer positions: may a query at ``q_pos`` see the key at ``k_pos``.

        ``xp`` is ``numpy`` (block tables) or ``jax.numpy`` (the ``xla`` backend), so both use one definition.
        """
        d = q_pos - k_pos
        if self.kind == "dense":
            ok = xp.ones_like(d, dtype=bool)
        elif self.kind == "streaming":
            ok = (k_pos < self.sink) | ((d if causal else xp.abs(d)) < self.local)
        else:
            qb, kb = q_pos // self.block, k_pos // self.block
            if self.kind == "strided":
                near = (qb - kb) if causal else xp.abs(qb - kb)
                ok = (near < self.local_blocks) | (kb % self.vert_stride == self.offset)
            else:
                grid = xp.asarray(self.mask.array)
                rows, cols = grid.shape
                ok = grid[xp.clip(qb, 0, rows - 1), xp.clip(kb, 0, cols - 1)]
        return ok & (d >= 0) if causal else ok

    # -- tile level ------------------------------------------------------------------------------------------

    def _block_grid(self, num_blocks: int, causal: bool) -> np.ndarray:
        """The pattern at its own block granularity, ``[num_blocks, num_blocks]`` bool (causal not applied)."""
        if self.kind == "block_mask":
            return self.mask.array[:num_blocks, :num_blocks]
        qb = np.arange(num_blocks)[:, None]
        kb = np.arange(num_blocks)[None, :]
        near = (qb - kb) if causal else np.abs(qb - kb)
        return (near < self.local_blocks) | (kb % self.vert_stride == self.offset)

    def classify(self, q0, q1, k0, k1, *, causal: bool, kv_len: int) -> np.ndarray:
        """Three-valued tile state (0 none, 1 some, 2 all allowed) of position rectangles ``[q0..q1] x [k0..k1]``.

        Exact for each primitive on its own; unions and intersections are conservative, and ``compile`` resolves
        every "some" tile element by element.
        """
        shape = np.broadcast(q0, k0).shape
        if self.kind == "dense":
            state = np.full(shape, _ALL, np.int8)
        elif self.kind == "streaming":
            sink = _interval_state(k1 < self.sink, k0 >= self.sink)
            lo, hi = q0 - k1, q1 - k0  # range of q - k over the rectangle
            if causal:
                band = _interval_state(hi < self.local, lo >= self.local)
            else:
                max_abs = np.maximum(np.abs(lo), np.abs(hi))
                min_abs = np.where((lo <= 0) & (hi >= 0), 0, np.minimum(np.abs(lo), np.abs(hi)))
                band = _interval_state(max_abs < self.local, min_abs >= self.local)
            state = np.maximum(sink, band)
        else:
            nb = -(-kv_len // self.block)
            grid = self._block_grid(nb, causal)
            counts = np.zeros((nb + 1, nb + 1), np.int64)
            counts[1:, 1:] = grid.cumsum(0).cumsum(1)
            r0, r1 = q0 // self.block, q1 // self.block + 1
            c0, c1 = k0 // self.block, k1 // self.block + 1
            inside = counts[r1, c1] - counts[r0, c1] - counts[r1, c0] + counts[r0, c0]
            state = _interval_state(inside == (r1 - r0) * (c1 - c0), inside == 0)
        if causal:
            state = np.minimum(state, _interval_state(k1 <= q0, k0 > q1))
        return np.broadcast_to(state, shape)

    def validate(self, kv_len: int) -> None:
        if self.kind == "block_mask":
            need = -(-kv_len // self.block)
            rows, cols = self.mask.array.shape
            if rows < need or cols < need:
                raise InputError(
                    f"block mask of shape {(rows, cols)} with block={self.block} does not cover {kv_len} positions "
                    f"(needs at least {(need, need)})"
                )


def _interval_state(all_true, none_true) -> np.ndarray:
    return np.where(all_true, _ALL, np.where(none_true, _NONE, _SOME)).astype(np.int8)


def normalize_patterns(patterns, num_kv_heads: int) -> tuple[HeadPattern, ...]:
    """One pattern per KV head from a single pattern or a sequence of ``num_kv_heads`` of them."""
    if isinstance(patterns, HeadPattern):
        return (patterns,) * num_kv_heads
    patterns = tuple(patterns)
    if len(patterns) != num_kv_heads or not all(isinstance(p, HeadPattern) for p in patterns):
        raise InputError(
            f"patterns: expected one HeadPattern or a sequence of {num_kv_heads} (one per KV head), "
            f"got {len(patterns)} items"
        )
    return patterns


def _tile_states(pattern: HeadPattern, q_len: int, kv_len: int, block_q: int, block_kv: int, causal: bool, masks):
    """State grid ``[nq, nk]`` of one pattern; partial tiles' masks are appended to ``masks`` (a dedup dict)."""
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
    tri[:, (cols[0] + 1) * block_kv > kv_len] = np.minimum(tri[:, (cols[0] + 1) * block_kv > kv_len], _SOME)
    states = np.where(tri == _ALL, FULL, EMPTY).astype(np.int32)

    undecided = np.argwhere(tri == _SOME)
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


def pattern_mask(
    patterns: Sequence[HeadPattern], q_len: int, kv_len: int, *, causal: bool, xp=np
):  # -> [Hkv, T, S] bool
    """The element mask of each KV head's pattern (``numpy`` or ``jax.numpy`` via ``xp``)."""
    q_pos = xp.arange(kv_len - q_len, kv_len)[:, None]
    k_pos = xp.arange(kv_len)[None, :]
    per = {p: p.allows(q_pos, k_pos, causal=causal, xp=xp) for p in dict.fromkeys(patterns)}
    return xp.stack([per[p] for p in patterns])
