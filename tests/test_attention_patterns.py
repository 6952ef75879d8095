"""Head patterns, their block tables and the ``xla`` backend of ``sparse_attention`` (no Pallas here)."""

import jax.numpy as jnp
import numpy as np
import pytest

from qv_jax.attention import (
    HeadPattern,
    block_tables,
    dot_product_attention,
    pattern_mask,
    sparse_attention,
    visited_blocks,
)
from qv_jax.attention.patterns import DensePattern, StreamingPattern, StridedPattern
from qv_jax.errors import InputError
from qv_jax.kernels.block_tables import EMPTY, FULL

BLOCK_MASK = np.array(
    [
        [1, 0, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 0, 0, 0],
        [1, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 0],
        [0, 0, 1, 0, 1, 0, 1],
    ],
    bool,
)

PATTERNS = {
    "dense": HeadPattern.dense(),
    "streaming": HeadPattern.streaming(sink=5, local=11),
    "streaming_no_sink": HeadPattern.streaming(sink=0, local=16),
    "strided": HeadPattern.strided(local_blocks=2, vert_stride=3, offset=1, block=8),
    "strided_aligned": HeadPattern.strided(local_blocks=1, vert_stride=2, block=16),
    "block_mask": HeadPattern.from_block_mask(BLOCK_MASK, block=10),
}


def literal_mask(pattern: HeadPattern, q_len: int, kv_len: int, causal: bool) -> np.ndarray:
    """The patterns' definitions written out one element at a time."""
    out = np.zeros((q_len, kv_len), bool)
    for t in range(q_len):
        qp = kv_len - q_len + t
        for kp in range(kv_len):
            if causal and kp > qp:
                continue
            d = qp - kp if causal else abs(qp - kp)
            if isinstance(pattern, DensePattern):
                ok = True
            elif isinstance(pattern, StreamingPattern):
                ok = kp < pattern.sink or d < pattern.local
            elif isinstance(pattern, StridedPattern):
                qb, kb = qp // pattern.block, kp // pattern.block
                near = qb - kb if causal else abs(qb - kb)
                ok = near < pattern.local_blocks or kb % pattern.vert_stride == pattern.offset
            else:
                ok = bool(pattern.mask.array[qp // pattern.block, kp // pattern.block])
            out[t, kp] = ok
    return out


def tile_view(mask: np.ndarray, bq: int, bkv: int) -> np.ndarray:
    """``[H, T, S]`` -> ``[H, nq, nk, bq, bkv]``, padding with False."""
    H, T, S = mask.shape
    nq, nk = -(-T // bq), -(-S // bkv)
    padded = np.zeros((H, nq * bq, nk * bkv), bool)
    padded[:, :T, :S] = mask
    return padded.reshape(H, nq, bq, nk, bkv).transpose(0, 1, 3, 2, 4)


SHAPES = [(64, 64, 16, 16), (37, 70, 16, 8), (70, 70, 32, 16), (5, 69, 8, 32)]


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("causal", [True, False])
def test_pattern_mask_matches_the_definitions(name, causal):
    pattern = PATTERNS[name]
    got = pattern_mask((pattern,), 37, 70, causal=causal)[0]
    np.testing.assert_array_equal(got, literal_mask(pattern, 37, 70, causal))


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_S{}_bq{}_bkv{}".format(*s))
@pytest.mark.parametrize("causal", [True, False])
def test_tables_encode_the_pattern_and_visit_only_non_empty_tiles(name, shape, causal):
    T, S, bq, bkv = shape
    patterns = (PATTERNS[name], PATTERNS["dense"])
    tables = block_tables(patterns, T, S, num_kv_heads=2, causal=causal, block_q=bq, block_kv=bkv)
    want = pattern_mask(patterns, T, S, causal=causal)
    np.testing.assert_array_equal(np.broadcast_to(tables.element_mask(), want.shape), want)

    tiles = tile_view(want, bq, bkv)
    non_empty = tiles.any(axis=(3, 4)).sum(axis=(1, 2))
    np.testing.assert_array_equal(
        visited_blocks(patterns, T, S, num_kv_heads=2, causal=causal, block_q=bq, block_kv=bkv), non_empty
    )

    # a tile is FULL only if every real (row, key) of it is allowed; a masked tile is neither full nor empty
    states = np.broadcast_to(tables.tile_states(), (2, *tiles.shape[1:3]))
    real = tile_view(np.ones((1, T, S), bool), bq, bkv)[0]
    for h in range(2):
        for i, j in zip(*np.nonzero(states[h] != EMPTY), strict=True):
            tile, inside = tiles[h, i, j], real[i, j]
            assert tile[inside].any()
            if states[h, i, j] == FULL:
                assert tile[inside].all()
            elif inside.all():
                assert not tile.all()


def test_tables_are_cached_and_shared_when_heads_agree():
    a = block_tables(HeadPattern.streaming(4, 8), 64, 64, num_kv_heads=4, block_q=16, block_kv=16)
    b = block_tables([HeadPattern.streaming(4, 8)] * 4, 64, 64, num_kv_heads=4, block_q=16, block_kv=16)
    assert a is b
    assert a.num_heads == 1
    mixed = block_tables(
        [HeadPattern.dense(), HeadPattern.streaming(4, 8)], 64, 64, num_kv_heads=2, block_q=16, block_kv=16
    )
    assert mixed.num_heads == 2


def test_streaming_visits_grow_with_rows_not_with_length():
    """A streaming head visits sink + window tiles per query block; a dense causal head the whole triangle."""
    n = 64 * 128
    dense, streaming = visited_blocks(
        [HeadPattern.dense(), HeadPattern.streaming(sink=128, local=256)], n, n, num_kv_heads=2
    )
    assert dense == 64 * 65 // 2
    # block 0 and 1 alone, then sink + the 3 tiles a 256-wide window touches (2 at the diagonal)
    assert streaming == 1 + 2 + 3 + 61 * 4


@pytest.mark.parametrize("causal", [True, False])
def test_xla_backend_is_dense_attention_under_the_pattern_mask(causal):
    rng = np.random.default_rng(0)
    B, Hq, Hkv, T, S, D = 2, 6, 3, 21, 33, 16
    q = jnp.asarray(rng.standard_normal((B, Hq, T, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), jnp.float32)
    patterns = (PATTERNS["streaming"], PATTERNS["strided"], PATTERNS["dense"])
    seg = np.repeat(np.array([[0, 1, 2], [0, 0, 1]]), 11, axis=1)
    out, lse = sparse_attention(q, k, v, patterns, segment_ids=jnp.asarray(seg), causal=causal, return_lse=True)
    mask = np.stack([literal_mask(p, T, S, causal) for p in patterns])
    seg_mask = seg[:, S - T :, None] == seg[:, None, :]
    want, want_lse = dot_product_attention(
        q, k, v, causal=False, mask=jnp.asarray(mask[None] & seg_mask[:, None]), return_lse=True
    )
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=1e-6)


def test_bad_arguments_raise_input_errors():
    q = jnp.ones((1, 4, 8, 16))
    k = jnp.ones((1, 2, 8, 16))
    with pytest.raises(InputError, match="one per KV head"):
        sparse_attention(q, k, k, [HeadPattern.dense()] * 3)
    with pytest.raises(InputError, match="backend"):
        sparse_attention(q, k, k, HeadPattern.dense(), backend="cuda")
    with pytest.raises(InputError, match="kernel"):
        sparse_attention(q, k, k, HeadPattern.dense(), backend="interpret", kernel="mosaic")
    with pytest.raises(InputError, match="last T of S"):
        sparse_attention(jnp.ones((1, 4, 9, 16)), k, k, HeadPattern.dense())
    with pytest.raises(InputError, match="kv ids"):
        sparse_attention(q, k, k, HeadPattern.dense(), segment_ids=jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(InputError, match="does not cover"):
        sparse_attention(q, k, k, HeadPattern.from_block_mask(np.ones((1, 1)), block=4))
    with pytest.raises(InputError, match="power of two"):
        sparse_attention(q, k, k, HeadPattern.dense(), backend="interpret", kernel="gpu", block_q=24, block_kv=16)
    with pytest.raises(InputError, match="multiple of 8"):
        sparse_attention(q, k, k, HeadPattern.dense(), backend="interpret", kernel="tpu", block_q=12, block_kv=16)
    with pytest.raises(InputError, match="streaming"):
        HeadPattern.streaming(sink=4, local=0)
    with pytest.raises(InputError, match="strided"):
        HeadPattern.strided(local_blocks=1, vert_stride=4, offset=4)
    with pytest.raises(InputError, match="2-D"):
        HeadPattern.from_block_mask(np.ones(3), block=4)


def test_patterns_hash_by_value():
    a = HeadPattern.from_block_mask(BLOCK_MASK, block=10)
    b = HeadPattern.from_block_mask(BLOCK_MASK.copy(), block=10)
    assert a == b and hash(a) == hash(b)
    assert a != HeadPattern.from_block_mask(~BLOCK_MASK, block=10)
    assert HeadPattern.streaming(4, 8) == HeadPattern.streaming(4, 8)
