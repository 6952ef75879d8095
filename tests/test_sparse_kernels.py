"""Sparse-decoding kernels: paged decode attention and page-selection scores, interpreted on CPU against their jnp
references, and lowered for TPU (Mosaic) and CUDA (Triton) at Qwen2.5-VL-7B shapes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qv_jax.attention import paged_decode_attention
from qv_jax.errors import InputError
from qv_jax.kernels.page_select import logical_page_scores

KERNELS = ["tpu", "gpu"]
PLATFORMS = {"tpu": ("tpu", "tpu_custom_call"), "cuda": ("gpu", "triton")}


def decode_inputs(seed, *, B=2, K=2, G=3, D=32, NP=10, P=8, N=6, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, K, G, D)), dtype)
    k = jnp.asarray(rng.standard_normal((B, K, NP, P, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, K, NP, P, D)), dtype)
    valid = rng.random((B, NP, P)) > 0.3
    valid[0, :, 0] = True
    idx = np.stack([np.stack([rng.permutation(NP)[:N] for _ in range(K)]) for _ in range(B)])
    counts = rng.integers(1, N + 1, (B, K))
    counts[-1, -1] = 0  # a head that reads nothing
    return q, k, v, jnp.asarray(valid), jnp.asarray(idx, jnp.int32), jnp.asarray(counts, jnp.int32)


def numpy_decode(q, k, v, valid, idx, counts):
    """Softmax over the tokens of the listed pages, one (row, KV head) at a time."""
    q, k, v, valid, idx, counts = (np.asarray(a, np.float64) for a in (q, k, v, valid, idx, counts))
    B, K, G, D = q.shape
    out, lse = np.zeros((B, K, G, D)), np.full((B, K, G), -np.inf)
    for b in range(B):
        for h in range(K):
            pages = idx[b, h, : int(counts[b, h])].astype(int)
            keys = k[b, h, pages].reshape(-1, D)
            vals = v[b, h, pages].reshape(-1, D)
            keep = valid[b, pages].reshape(-1).astype(bool)
            if not keep.any():
                continue
            logits = q[b, h] @ keys[keep].T / np.sqrt(D)
            m = logits.max(axis=1, keepdims=True)
            p = np.exp(logits - m)
            out[b, h] = p @ vals[keep] / p.sum(axis=1, keepdims=True)
            lse[b, h] = m[:, 0] + np.log(p.sum(axis=1))
    return out, lse


def test_reference_matches_a_numpy_loop():
    args = decode_inputs(0)
    out, lse = paged_decode_attention(*args, backend="xla")
    want, want_lse = numpy_decode(*args)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5)
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), np.isfinite(want_lse))
    assert np.all(np.asarray(out)[np.isneginf(want_lse)] == 0.0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_paged_decode_kernel_matches_reference_f32(kernel, num_splits):
    args = decode_inputs(1)
    want, want_lse = paged_decode_attention(*args, backend="xla")
    out, lse = paged_decode_attention(*args, backend="interpret", kernel=kernel, num_splits=num_splits)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)
    finite = np.isfinite(np.asarray(want_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(want_lse)[finite], atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_paged_decode_kernel_bf16_within_2e2(kernel):
    args = decode_inputs(2, G=7, D=64, P=16, NP=12, N=9, dtype=jnp.bfloat16)
    want, _ = paged_decode_attention(*args, backend="xla")
    out, _ = paged_decode_attention(*args, backend="interpret", kernel=kernel)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), atol=2e-2)


def test_paged_decode_rejects_mismatched_operands():
    q, k, v, valid, idx, counts = decode_inputs(3)
    with pytest.raises(InputError, match="token_valid"):
        paged_decode_attention(q, k, v, valid[:, :3], idx, counts)
    with pytest.raises(InputError, match="page_indices"):
        paged_decode_attention(q, k, v, valid, idx[0], counts)
    with pytest.raises(InputError, match="powers of two"):
        paged_decode_attention(q[..., :24], k[..., :24], v[..., :24], valid, idx, counts, backend="interpret",
                               kernel="gpu")  # fmt: skip


def score_inputs(seed, *, B=2, K=2, G=3, D=16, NL=256):
    """Small integers, so every score is exact in float32 and ties are real ties."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-3, 4, (B, K, G, D)).astype(np.float32)
    a, b = rng.integers(-3, 4, (2, B, K, NL, D))
    valid = rng.random((B, NL)) > 0.2
    return q, np.minimum(a, b).astype(np.float32), np.maximum(a, b).astype(np.float32), valid


def numpy_scores(q, k_min, k_max, valid):
    """The rule as written: sum_d max(q_d kmax_d, q_d kmin_d), max over the group's query heads."""
    per_head = np.maximum(q[:, :, :, None, :] * k_max[:, :, None], q[:, :, :, None, :] * k_min[:, :, None]).sum(-1)
    return np.where(valid[:, None], per_head.max(axis=2), -np.inf)


@pytest.mark.parametrize("impl, interpret", [("reference", False), ("tpu", True), ("gpu", True)])
def test_page_scores_equal_the_rule_exactly(impl, interpret):
    q, k_min, k_max, valid = score_inputs(4)
    got = logical_page_scores(*map(jnp.asarray, (q, k_min, k_max, valid)), impl=impl, interpret=interpret)
    np.testing.assert_array_equal(np.asarray(got), numpy_scores(q, k_min, k_max, valid))


# ---- lowering at production shapes ---------------------------------------------------------------------------

# Qwen2.5-VL-7B: 7 query heads per KV head, head dim 128; 64K context in pages of 64 (logical pages of 16)
G7, D7, P7, NP7 = 7, 128, 64, 1024


def custom_calls(fn, args, platform):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return len(re.findall(rf"custom_call @\S*{PLATFORMS[platform][1]}", text))


@pytest.mark.parametrize("listed", [64, NP7], ids=["budget_4096", "all_pages"])
@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_paged_decode_lowers(platform, listed):
    B, K = 2, 2
    args = (
        jax.ShapeDtypeStruct((B, K, G7, D7), jnp.bfloat16),
        jax.ShapeDtypeStruct((B, K, NP7, P7, D7), jnp.bfloat16),
        jax.ShapeDtypeStruct((B, K, NP7, P7, D7), jnp.bfloat16),
        jax.ShapeDtypeStruct((B, NP7, P7), jnp.bool_),
        jax.ShapeDtypeStruct((B, K, listed), jnp.int32),
        jax.ShapeDtypeStruct((B, K), jnp.int32),
    )

    def fn(*a):
        return paged_decode_attention(*a, backend="pallas", kernel=PLATFORMS[platform][0])

    assert custom_calls(fn, args, platform) == 1


@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_page_scores_lower(platform):
    NL = NP7 * 4
    args = (
        jax.ShapeDtypeStruct((1, 2, G7, D7), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, 2, NL, D7), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, 2, NL, D7), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, NL), jnp.bool_),
    )

    def fn(*a):
        return logical_page_scores(*a, impl=PLATFORMS[platform][0])

    assert custom_calls(fn, args, platform) == 1
