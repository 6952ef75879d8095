"""Declarative attention patterns, one per KV head: what a query may see as a function of two positions alone.

Data-dependent restrictions (segment ids) are applied on top by whoever runs the pattern. Positions follow the
bottom-right convention of ``qv_jax.attention.reference``: the ``T`` queries are the last ``T`` of the ``S`` key
positions. Each kind is a small frozen class sharing the :class:`HeadPattern` protocol (as splash attention's mask
classes do); ``qv_jax.attention.tables`` compiles them into the block tables the kernels walk. See
docs/attention.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from qv_jax.errors import InputError

# three-valued tile classification; AND is min, OR is max
NONE, SOME, ALL = 0, 1, 2


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


class HeadPattern:
    """What one KV head (and the query heads of its group) attends to.

    Build with :meth:`dense`, :meth:`streaming`, :meth:`strided` or :meth:`from_block_mask` (or the classes).
    A kind defines :meth:`_allows` (element level, numpy or jax.numpy) and :meth:`_tile_state` (a conservative
    classification of position rectangles); causality is applied here for every kind.
    """

    is_dense: ClassVar[bool] = False

    @staticmethod
    def dense() -> DensePattern:
        """Every key (the causal triangle when causal)."""
        return DensePattern()

    @staticmethod
    def streaming(sink: int, local: int) -> StreamingPattern:
        """DuoAttention / LServe streaming heads: the first ``sink`` keys and the ``local`` nearest ones."""
        return StreamingPattern(sink, local)

    @staticmethod
    def strided(local_blocks: int, vert_stride: int, offset: int = 0, block: int = 128) -> StridedPattern:
        """LongGen / S2-attention: the ``local_blocks`` nearest key blocks plus every ``vert_stride``-th block."""
        return StridedPattern(local_blocks, vert_stride, offset, block)

    @staticmethod
    def from_block_mask(mask, block: int) -> BlockMaskPattern:
        """Any boolean ``mask[query block, key block]`` over absolute ``block``-token blocks."""
        return BlockMaskPattern(mask if isinstance(mask, BlockMask) else BlockMask(mask), block)

    def allows(self, q_pos, k_pos, *, causal: bool, xp=np):
        """Boolean array, broadcast from integer positions: may a query at ``q_pos`` see the key at ``k_pos``.

        ``xp`` is ``numpy`` (block tables) or ``jax.numpy`` (the reference backend): one definition for both.
        """
        ok = self._allows(q_pos, k_pos, causal=causal, xp=xp)
        return ok & (q_pos - k_pos >= 0) if causal else ok

    def classify(self, q0, q1, k0, k1, *, causal: bool, kv_len: int) -> np.ndarray:
        """Tile state (``NONE``, ``SOME`` or ``ALL`` allowed) of position rectangles ``[q0..q1] x [k0..k1]``.

        Exact for each kind; the table compiler resolves every ``SOME`` tile element by element.
        """
        shape = np.broadcast(q0, k0).shape
        state = self._tile_state(q0, q1, k0, k1, causal=causal, kv_len=kv_len)
        if causal:
            state = np.minimum(state, interval_state(k1 <= q0, k0 > q1))
        return np.broadcast_to(state, shape)

    def validate(self, kv_len: int) -> None:
        """Raise :class:`InputError` if the pattern cannot describe ``kv_len`` key positions."""

    def _allows(self, q_pos, k_pos, *, causal: bool, xp):
        raise NotImplementedError

    def _tile_state(self, q0, q1, k0, k1, *, causal: bool, kv_len: int) -> np.ndarray:
        raise NotImplementedError


def interval_state(all_true, none_true) -> np.ndarray:
    return np.where(all_true, ALL, np.where(none_true, NONE, SOME)).astype(np.int8)


@dataclasses.dataclass(frozen=True)
class DensePattern(HeadPattern):
    is_dense: ClassVar[bool] = True

    def _allows(self, q_pos, k_pos, *, causal: bool, xp):
        return xp.ones_like(q_pos - k_pos, dtype=bool)

    def _tile_state(self, q0, q1, k0, k1, *, causal: bool, kv_len: int) -> np.ndarray:
        return np.full(np.broadcast(q0, k0).shape, ALL, np.int8)


@dataclasses.dataclass(frozen=True)
class StreamingPattern(HeadPattern):
    """The first ``sink`` keys and the ``local`` nearest ones: ``q - k < local`` (``|q - k| < local`` when not
    causal)."""

    sink: int
    local: int

    def __post_init__(self):
        if self.sink < 0 or self.local < 1:
            raise InputError(
                f"streaming pattern needs sink >= 0 and local >= 1, got sink={self.sink}, local={self.local}"
            )

    def _allows(self, q_pos, k_pos, *, causal: bool, xp):
        d = q_pos - k_pos
        return (k_pos < self.sink) | ((d if causal else xp.abs(d)) < self.local)

    def _tile_state(self, q0, q1, k0, k1, *, causal: bool, kv_len: int) -> np.ndarray:
        sink = interval_state(k1 < self.sink, k0 >= self.sink)
        lo, hi = q0 - k1, q1 - k0  # range of q - k over the rectangle
        if causal:
            band = interval_state(hi < self.local, lo >= self.local)
        else:
            max_abs = np.maximum(np.abs(lo), np.abs(hi))
            min_abs = np.where((lo <= 0) & (hi >= 0), 0, np.minimum(np.abs(lo), np.abs(hi)))
            band = interval_state(max_abs < self.local, min_abs >= self.local)
        return np.maximum(sink, band)


class _BlockGrid(HeadPattern):
    """Patterns decided per ``block`` x ``block`` cell of the (query, key) plane."""

    block: int

    def _grid(self, num_blocks: int, causal: bool) -> np.ndarray:
        """The pattern at its block granularity, ``[num_blocks, num_blocks]`` bool (causality not applied)."""
        raise NotImplementedError

    def _grid_at(self, q_block, k_block, *, causal: bool, xp):
        raise NotImplementedError

    def _allows(self, q_pos, k_pos, *, causal: bool, xp):
        return self._grid_at(q_pos // self.block, k_pos // self.block, causal=causal, xp=xp)

    def _tile_state(self, q0, q1, k0, k1, *, causal: bool, kv_len: int) -> np.ndarray:
        num_blocks = -(-kv_len // self.block)
        counts = np.zeros((num_blocks + 1, num_blocks + 1), np.int64)
        counts[1:, 1:] = self._grid(num_blocks, causal).cumsum(0).cumsum(1)
        r0, r1 = q0 // self.block, q1 // self.block + 1
        c0, c1 = k0 // self.block, k1 // self.block + 1
        inside = counts[r1, c1] - counts[r0, c1] - counts[r1, c0] + counts[r0, c0]
        return interval_state(inside == (r1 - r0) * (c1 - c0), inside == 0)


@dataclasses.dataclass(frozen=True)
class StridedPattern(_BlockGrid):
    """In ``block``-token units: the ``local_blocks`` nearest key blocks (the query's own included) plus every key
    block ``kb`` with ``kb % vert_stride == offset``; offsets that differ per head spread the strided blocks."""

    local_blocks: int
    vert_stride: int
    offset: int = 0
    block: int = 128

    def __post_init__(self):
        if self.local_blocks < 1 or self.vert_stride < 1 or self.block < 1 or not 0 <= self.offset < self.vert_stride:
            raise InputError(
                "strided pattern needs local_blocks >= 1, vert_stride >= 1, block >= 1 and 0 <= offset < "
                f"vert_stride; got local_blocks={self.local_blocks}, vert_stride={self.vert_stride}, "
                f"offset={self.offset}, block={self.block}"
            )

    def _grid_at(self, q_block, k_block, *, causal: bool, xp):
        near = (q_block - k_block) if causal else xp.abs(q_block - k_block)
        return (near < self.local_blocks) | (k_block % self.vert_stride == self.offset)

    def _grid(self, num_blocks: int, causal: bool) -> np.ndarray:
        blocks = np.arange(num_blocks)
        return self._grid_at(blocks[:, None], blocks[None, :], causal=causal, xp=np)


@dataclasses.dataclass(frozen=True)
class BlockMaskPattern(_BlockGrid):
    """Any boolean ``mask[query block, key block]`` over absolute ``block``-token blocks."""

    mask: BlockMask
    block: int

    def __post_init__(self):
        if self.block < 1:
            raise InputError(f"block mask pattern needs block >= 1, got {self.block}")
        if not isinstance(self.mask, BlockMask):
            object.__setattr__(self, "mask", BlockMask(self.mask))

    def _grid_at(self, q_block, k_block, *, causal: bool, xp):
        grid = xp.asarray(self.mask.array)
        rows, cols = grid.shape
        return grid[xp.clip(q_block, 0, rows - 1), xp.clip(k_block, 0, cols - 1)]

    def _grid(self, num_blocks: int, causal: bool) -> np.ndarray:
        return self.mask.array[:num_blocks, :num_blocks]

    def validate(self, kv_len: int) -> None:
        need = -(-kv_len // self.block)
        rows, cols = self.mask.array.shape
        if rows < need or cols < need:
            raise InputError(
                f"block mask of shape {(rows, cols)} with block={self.block} does not cover {kv_len} positions "
                f"(needs at least {(need, need)})"
            )


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


def pattern_mask(patterns: Sequence[HeadPattern], q_len: int, kv_len: int, *, causal: bool, xp=np):
    """The element mask ``[K, T, S]`` bool of each KV head's pattern (``numpy`` or ``jax.numpy`` via ``xp``)."""
    q_pos_T1 = xp.arange(kv_len - q_len, kv_len)[:, None]
    k_pos_1S = xp.arange(kv_len)[None, :]
    per = {p: p.allows(q_pos_T1, k_pos_1S, causal=causal, xp=xp) for p in dict.fromkeys(patterns)}
    return xp.stack([per[p] for p in patterns])
