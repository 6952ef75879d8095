"""The block-sparse Pallas kernels in interpret mode, and the chunked jnp path that walks the same tables, against
the dense masked reference: outputs, lse, gradients.

Shapes are small (the CPU interpreter runs grid steps one by one); tile sizes are small too so that every case
has full, partial and skipped tiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qv_jax.attention import HeadPattern, block_tables, sparse_attention
from qv_jax.kernels.block_sparse import block_sparse_attention

STREAM = HeadPattern.streaming(sink=3, local=10)
STRIDED = HeadPattern.strided(local_blocks=1, vert_stride=3, offset=2, block=8)
BLOCKY = HeadPattern.from_block_mask(np.tril(np.ones((6, 6), bool)) & ~np.eye(6, k=-2, dtype=bool), block=8)
DENSE = HeadPattern.dense()

# name: (B, Hq, Hkv, T, S, D, patterns, causal, segment ids as kv ids [B, S] or None)
CASES = {
    "mixed_heads_gqa": (1, 4, 2, 32, 32, 64, (STREAM, STRIDED), True, None),
    "dense_mha_d128": (1, 2, 2, 32, 32, 128, DENSE, True, None),
    "odd_lengths_chunked_d80": (2, 6, 2, 21, 45, 80, (DENSE, BLOCKY), True, None),
    "packed_segments": (2, 2, 1, 40, 40, 64, STREAM, True, "packed"),
    "vision_windows_d80": (1, 2, 2, 36, 36, 80, (DENSE, STREAM), False, "windows"),
}


def make_inputs(case, dtype):
    B, Hq, Hkv, T, S, D, patterns, causal, seg_kind = CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    q, k, v = (
        jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((B, Hq, T, D), (B, Hkv, S, D), (B, Hkv, S, D))
    )
    seg = None
    if seg_kind == "packed":  # three packed prompts, then padding that nothing may see
        seg = jnp.asarray(np.array([[0] * 9 + [1] * 20 + [2] * 8 + [-1] * 3, [5] * 17 + [6] * 23]))
    elif seg_kind == "windows":
        seg = jnp.asarray(np.arange(S)[None] // 7)
    return q, k, v, patterns, causal, seg


# (backend, kernel) pairs under test: the Pallas kernels interpreted, and the chunked jnp tiles
IMPLS = [("interpret", "tpu"), ("interpret", "gpu"), ("chunked", None)]
IMPL_IDS = ["tpu", "gpu", "chunked"]


def run(q, k, v, patterns, causal, seg, backend, kernel=None):
    return sparse_attention(
        q,
        k,
        v,
        patterns,
        segment_ids=seg,
        causal=causal,
        backend=backend,
        kernel=kernel,
        block_q=16,
        block_kv=16,
        return_lse=True,
    )


def loss_fn(patterns, causal, seg, backend, kernel=None):
    """A loss that weights every output element differently and also flows through the log-sum-exp."""

    def loss(q, k, v):
        out, lse = run(q, k, v, patterns, causal, seg, backend, kernel)
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out.astype(jnp.float32) * w) + 0.1 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    return loss


def assert_close(got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    err = np.max(np.abs(got - want), initial=0.0)
    assert err <= tol * max(1.0, np.max(np.abs(want), initial=0.0)), err


@pytest.mark.parametrize(("backend", "kernel"), IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_dense_reference_f32(backend, kernel, case):
    q, k, v, patterns, causal, seg = make_inputs(case, jnp.float32)
    out, lse = run(q, k, v, patterns, causal, seg, backend, kernel)
    want, want_lse = run(q, k, v, patterns, causal, seg, "xla")
    assert out.dtype == jnp.float32
    assert_close(out, want, 1e-5)
    finite = np.isfinite(np.asarray(want_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    assert_close(np.asarray(lse)[finite], np.asarray(want_lse)[finite], 1e-5)


@pytest.mark.parametrize("T", [1, 5, 33])
def test_chunked_default_tiles_fit_short_queries_behind_a_long_memory(T):
    """A decode token or a short question behind a long cache runs in a query tile of its own size, not the
    default 256 rows: the same outputs and lse as the reference, with unwritten slots (negative ids) unseen."""
    B, N, K, S, H = 2, 4, 2, 600, 64
    rng = np.random.default_rng(T)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((B, N, T, H), (B, K, S, H), (B, K, S, H)))
    kv_ids = jnp.asarray(np.where(np.arange(S) < [[450], [S]], 0, -1))
    seg = (jnp.zeros((B, T), jnp.int32), kv_ids)
    patterns = (DENSE, HeadPattern.streaming(sink=4, local=100))
    out, lse = sparse_attention(q, k, v, patterns, segment_ids=seg, backend="chunked", return_lse=True)
    want, want_lse = sparse_attention(q, k, v, patterns, segment_ids=seg, backend="reference", return_lse=True)
    assert_close(out, want, 1e-5)
    assert_close(lse, want_lse, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "kernel"), IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_dense_reference_f32(backend, kernel, case):
    q, k, v, patterns, causal, seg = make_inputs(case, jnp.float32)
    got = jax.grad(loss_fn(patterns, causal, seg, backend, kernel), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss_fn(patterns, causal, seg, "xla"), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_bf16_outputs_and_gradients_within_2e2(kernel):
    q, k, v, patterns, causal, seg = make_inputs("mixed_heads_gqa", jnp.bfloat16)
    out, _ = run(q, k, v, patterns, causal, seg, "interpret", kernel)
    want, _ = run(q, k, v, patterns, causal, seg, "xla")
    assert out.dtype == jnp.bfloat16
    assert_close(out, want, 2e-2)
    got = jax.grad(loss_fn(patterns, causal, seg, "interpret", kernel), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss_fn(patterns, causal, seg, "xla"), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        assert_close(g, w, 2e-2)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_query_that_sees_nothing_gets_zeros_and_minus_inf_lse(kernel):
    q = jnp.ones((1, 1, 16, 64))
    k = jnp.ones((1, 1, 16, 64))
    # query rows of segment 9 have no key of their segment
    q_seg = jnp.asarray(np.array([[0] * 8 + [9] * 8]))
    kv_seg = jnp.zeros((1, 16), jnp.int32)
    out, lse = sparse_attention(
        q, k, k, DENSE, segment_ids=(q_seg, kv_seg), causal=False, backend="interpret", kernel=kernel,
        block_q=16, block_kv=16, return_lse=True,
    )  # fmt: skip
    assert np.all(np.asarray(out[0, 0, 8:]) == 0.0)
    assert np.all(np.isneginf(np.asarray(lse[0, 0, 8:])))
    np.testing.assert_allclose(np.asarray(out[0, 0, :8]), 1.0, rtol=1e-6)


def test_reference_implementation_agrees_with_xla_backend():
    """The jnp reference beside the kernels reads the same tables; it must agree with the pattern's mask."""
    q, k, v, patterns, causal, seg = make_inputs("odd_lengths_chunked_d80", jnp.float32)
    tables = block_tables(patterns, q.shape[2], k.shape[2], num_kv_heads=k.shape[1], block_q=16, block_kv=16)
    out, lse = block_sparse_attention(q, k, v, tables, impl="reference")
    want, want_lse = run(q, k, v, patterns, causal, seg, "xla")
    assert_close(out, want, 1e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=1e-5)


def test_kernels_under_jit_and_interpret_tpu_kernel_is_the_default():
    q, k, v, patterns, _, _ = make_inputs("mixed_heads_gqa", jnp.float32)
    fn = jax.jit(lambda q, k, v: sparse_attention(q, k, v, patterns, backend="interpret", block_q=16, block_kv=16))
    want = sparse_attention(q, k, v, patterns, backend="interpret", kernel="tpu", block_q=16, block_kv=16)
    np.testing.assert_array_equal(np.asarray(fn(q, k, v)), np.asarray(want))
