import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qv_jax.attention import dot_product_attention
from qv_jax.errors import InputError


def naive_attention(q, k, v, allowed):
    """Per-head loops in numpy float64: the most literal definition of masked softmax attention."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    out = np.zeros((B, Hq, T, D))
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for t in range(T):
                keep = allowed[b, t]
                if not keep.any():
                    continue
                s = q[b, h, t] @ k[b, kh, keep].T / np.sqrt(D)
                p = np.exp(s - s.max())
                out[b, h, t] = p @ v[b, kh, keep] / p.sum()
    return out


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
def test_matches_naive_with_cache_offset_and_segments(hq, hkv):
    rng = np.random.default_rng(0)
    B, T, S, D = 2, 5, 9, 8
    q = rng.standard_normal((B, hq, T, D))
    k = rng.standard_normal((B, hkv, S, D))
    v = rng.standard_normal((B, hkv, S, D))
    kv_seg = np.array([[0, 0, 0, 1, 1, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0, 0, 0, 0]])
    q_seg = kv_seg[:, S - T :].copy()
    q_seg[0, -1] = 1
    q_pos = np.arange(S - T, S)
    allowed = (np.arange(S)[None, None, :] <= q_pos[None, :, None]) & (q_seg[:, :, None] == kv_seg[:, None, :])
    allowed &= (kv_seg >= 0)[:, None, :]
    got = dot_product_attention(
        jnp.asarray(q, jnp.float32),
        jnp.asarray(k, jnp.float32),
        jnp.asarray(v, jnp.float32),
        q_segment_ids=jnp.asarray(q_seg),
        kv_segment_ids=jnp.asarray(kv_seg),
    )
    np.testing.assert_allclose(np.asarray(got), naive_attention(q, k, v, allowed), atol=1e-5)


def test_fully_masked_row_is_zero_with_minus_inf_lse():
    q = jnp.ones((1, 1, 2, 4))
    k = jnp.ones((1, 1, 3, 4))
    seg = jnp.array([[0, 0, 0]])
    out, lse = dot_product_attention(
        q, k, k, causal=False, q_segment_ids=jnp.array([[0, 5]]), kv_segment_ids=seg, return_lse=True
    )
    assert np.all(np.asarray(out[0, 0, 1]) == 0.0)
    assert np.isneginf(np.asarray(lse[0, 0, 1]))
    # every logit is q·k/sqrt(D) = 4/2 = 2, over 3 keys
    np.testing.assert_allclose(np.asarray(lse[0, 0, 0]), 2.0 + np.log(3), rtol=1e-6)


def test_lse_merges_partial_results():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 2, 3, 8)), jnp.float32) for _ in range(3))
    full = dot_product_attention(q, k, v, causal=False)
    kv_seg_a = jnp.array([[0, 0, -1]])
    kv_seg_b = jnp.array([[-1, -1, 0]])
    oa, la = dot_product_attention(q, k, v, causal=False, kv_segment_ids=kv_seg_a, return_lse=True)
    ob, lb = dot_product_attention(q, k, v, causal=False, kv_segment_ids=kv_seg_b, return_lse=True)
    lse = jnp.logaddexp(la, lb)
    merged = oa * jnp.exp(la - lse)[..., None] + ob * jnp.exp(lb - lse)[..., None]
    np.testing.assert_allclose(np.asarray(merged), np.asarray(full), atol=1e-6)


def test_bad_shapes_raise():
    with pytest.raises(InputError, match="multiple"):
        dot_product_attention(jnp.ones((1, 3, 2, 4)), jnp.ones((1, 2, 2, 4)), jnp.ones((1, 2, 2, 4)))
    with pytest.raises(InputError):
        dot_product_attention(jnp.ones((1, 2, 4)), jnp.ones((1, 2, 2, 4)), jnp.ones((1, 2, 2, 4)))


def test_jits_and_keeps_dtype():
    q = jnp.ones((1, 2, 4, 8), jnp.bfloat16)
    out = jax.jit(dot_product_attention)(q, q, q)
    assert out.dtype == jnp.bfloat16
