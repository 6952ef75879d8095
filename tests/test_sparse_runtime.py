"""Sparse decoding end to end on a tiny random model: parity with dense decoding, streaming heads against a masked
dense reference, decoding from a prefilled dense cache, KV bytes, greedy generation, load_model(sparsity=), and the
whole sparse prefill / decode steps lowered for TPU and CUDA."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qv_jax.attention import SparsityConfig, dot_product_attention
from qv_jax.cache.sparse import SparseKVCache, sparse_kv_bytes
from qv_jax.errors import ConfigError
from qv_jax.runtime import VisionLanguageModel, encode, load_model
from qv_jax.runtime import dense as dense_steps
from qv_jax.runtime import sparse as sparse_steps
from qv_jax.testing import tiny_config

CONFIG = tiny_config()
T_CFG = CONFIG.text
SINK, LOCAL = 3, 6
SMALL = dict(page_size=8, logical_page_size=4, backend="xla")
STREAMING = [[True, False], [False, True]]  # one streaming KV head per layer, in the model's own order
PROMPT, NEW, CHUNK = 40, 10, 8


def make_batch(seed=0):
    """Prompt + continuation ids, segment ids (row 1 left-padded) and positions for teacher-forced decoding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 400, (2, PROMPT + NEW))
    seg = np.zeros(ids.shape, np.int32)
    seg[1, :13] = -1
    pos = np.broadcast_to(np.maximum(np.cumsum(seg >= 0, 1) - 1, 0), (3, *ids.shape)).astype(np.int32)
    return ids, seg, pos


def run_steps(m, cache, ids, seg, pos, run=sparse_steps):
    """Chunked prefill of the prompt, then teacher-forced decode steps, with the steps of ``run`` (sparse by
    default, ``qv_jax.runtime.dense`` for a dense cache): logits per decoded step."""
    x = encode.embed(m.graphdef, m.state, jnp.asarray(ids))
    for s in range(0, PROMPT, CHUNK):
        logits, cache = run.prefill(
            m.graphdef, m.state, cache, x[:, s : s + CHUNK], jnp.asarray(pos[:, :, s : s + CHUNK]),
            jnp.asarray(seg[:, s : s + CHUNK]),
        )  # fmt: skip
    out = [np.asarray(logits)]
    for i in range(PROMPT, PROMPT + NEW - 1):
        logits, cache = run.decode_step(m.graphdef, m.state, cache, jnp.asarray(ids[:, i]), jnp.asarray(pos[0, :, i]))
        out.append(np.asarray(logits))
    return np.stack(out, axis=1), cache


def test_no_streaming_heads_and_budget_over_context_equal_dense_decoding():
    ids, seg, pos = make_batch()
    sparse = VisionLanguageModel.random(CONFIG, seed=1, sparsity=SparsityConfig(token_budget=128, **SMALL))
    cache = sparse.new_sparse_cache(2, 128)
    got, cache = run_steps(sparse, cache, ids, seg, pos)
    assert int(cache.selected_at) == -1  # the context never exceeded the budget

    dense = VisionLanguageModel.random(CONFIG, seed=1)
    want, _ = run_steps(dense, dense.new_cache(2, 128), ids, seg, pos, run=dense_steps)
    np.testing.assert_allclose(got, want, atol=1e-5)


class MaskedReference:
    """Dense attention where streaming KV heads see the row's first SINK visible tokens and the LOCAL latest ones
    (from query slot ``dense_until`` on; earlier queries see everything, as after a dense prefill)."""

    def __init__(self, seg, streaming, dense_until=0):
        self.seg = jnp.asarray(seg)
        self.streaming = np.asarray(streaming)
        rank = jnp.cumsum(self.seg >= 0, axis=1) - 1
        near = (rank[:, None, :] < SINK) | (rank[:, :, None] - rank[:, None, :] < LOCAL)
        self.window = near | (jnp.arange(seg.shape[1]) < dense_until)[None, :, None]

    def __call__(self, layer, q, k, v):
        heads = jnp.asarray(self.streaming[layer])[None, :, None, None]
        mask = jnp.where(heads, self.window[:, None], True)
        return dot_product_attention(q, k, v, causal=True, q_segment_ids=self.seg, kv_segment_ids=self.seg, mask=mask)


def reference_logits(m, ids, seg, pos, dense_until=0):
    model = nnx.merge(m.graphdef, m.state)
    handler = MaskedReference(seg, m.sparsity.streaming_mask(2, 2), dense_until)
    h = model.text(model.text.embed_tokens(jnp.asarray(ids)), jnp.asarray(pos), handler)
    return np.asarray(model.text.logits(h))[:, PROMPT - 1 : PROMPT + NEW - 1]


@pytest.mark.slow
def test_streaming_heads_equal_dense_attention_restricted_to_sink_and_recent_tokens():
    ids, seg, pos = make_batch(1)
    cfg = SparsityConfig(streaming_heads=STREAMING, sink=SINK, local=LOCAL, token_budget=None, **SMALL)
    m = VisionLanguageModel.random(CONFIG, seed=2, sparsity=cfg)
    got, _ = run_steps(m, m.new_sparse_cache(2, 64), ids, seg, pos)
    np.testing.assert_allclose(got, reference_logits(m, ids, seg, pos), atol=1e-5)


def test_decoding_from_a_prefilled_dense_cache():
    """QuickPrefill's path: dense prefill, SparseKVCache.from_dense, then sparse decoding."""
    ids, seg, pos = make_batch(2)
    cfg = SparsityConfig(streaming_heads=STREAMING, sink=SINK, local=LOCAL, token_budget=None, **SMALL)
    m = VisionLanguageModel.random(CONFIG, seed=3, sparsity=cfg)
    dense = m.new_cache(2, 64)
    x = encode.embed(m.graphdef, m.state, jnp.asarray(ids[:, :PROMPT]))
    logits, dense = dense_steps.prefill(m.graphdef, m.state, dense, x, jnp.asarray(pos[:, :, :PROMPT]), jnp.asarray(
        seg[:, :PROMPT]))  # fmt: skip
    cache = SparseKVCache.from_dense(dense, m.sparsity, capacity=PROMPT + NEW)
    got = [np.asarray(logits)]
    for i in range(PROMPT, PROMPT + NEW - 1):
        logits, cache = sparse_steps.decode_step(
            m.graphdef, m.state, cache, jnp.asarray(ids[:, i]), jnp.asarray(pos[0, :, i])
        )
        got.append(np.asarray(logits))
    want = reference_logits(m, ids, seg, pos, dense_until=PROMPT)
    np.testing.assert_allclose(np.stack(got, axis=1), want, atol=1e-5)


def test_kv_bytes_match_the_formula_and_halve_with_half_streaming_heads():
    # Qwen2.5-VL-7B's text decoder: 28 layers of 4 KV heads of 128; half of them streaming, bf16, 32K context
    L, K, H, C = 28, 4, 128, 32768
    half = SparsityConfig(streaming_heads=[[False, False, True, True]] * L)
    sparse = sparse_kv_bytes(half, num_layers=L, num_kv_heads=K, head_dim=H, batch=1, capacity=C, dtype=jnp.bfloat16)
    retrieval = L * 2 * (2 * C + 2 * C // 16) * H * 2  # keys + values, key min + max
    streaming = L * 2 * 2 * 320 * H * 2  # sink 64 + ring 256
    bookkeeping = 4 * (C + 320 + 1 + 2) + 4 * L * 2 * 63
    assert sparse == retrieval + streaming + bookkeeping
    dense = 2 * L * K * C * H * 2
    assert 1.8 < dense / sparse < 2.0

    for cfg in (
        SparsityConfig(streaming_heads=[[True, False], [True, True]], sink=SINK, local=LOCAL, **SMALL),
        SparsityConfig(token_budget=None, **SMALL),
        SparsityConfig(token_budget=4096, **SMALL),  # a budget past the capacity
    ):
        for capacity in (100, 513):
            cache = SparseKVCache.create(
                cfg.retrieval_first(), num_kv_heads=2, batch=3, capacity=capacity, head_dim=16, num_layers=2
            )
            want = sparse_kv_bytes(cfg, num_layers=2, num_kv_heads=2, head_dim=16, batch=3, capacity=capacity,
                                   dtype=jnp.float32)  # fmt: skip
            assert cache.nbytes == want


@pytest.fixture(scope="module")
def sparse_model():
    cfg = SparsityConfig(streaming_heads=STREAMING, sink=SINK, local=LOCAL, token_budget=16, reselect_every=2, **SMALL)
    return VisionLanguageModel.random(CONFIG, seed=4, sparsity=cfg)


@pytest.mark.slow
def test_greedy_generation_with_streaming_heads_and_page_selection(sparse_model):
    m = sparse_model
    ids = np.random.default_rng(5).integers(0, 400, (2, 30))
    mask = np.ones_like(ids)
    mask[1, :6] = 0
    out = m.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], return_dict=True)
    assert out.sequences.shape == (2, 54) and np.all(out.sequences[:, 30:] < T_CFG.vocab_size)
    # the prompt fills 64 slots (one padded chunk), past the 16-token budget: every decode step reads 2 pages
    assert out.kv_capacity == 512 and out.kv_bytes == m.kv_cache_bytes(128, batch=2)
    dense = VisionLanguageModel.random(CONFIG, seed=4)
    assert dense.generate(ids, attention_mask=mask, max_new_tokens=2, return_dict=True).kv_bytes == (
        dense.kv_cache_bytes(128, batch=2)
    )

    # the same tokens, step by step through the jitted prefill / decode steps
    order = np.argsort(mask != 0, axis=-1, kind="stable")
    aligned, amask = np.take_along_axis(ids, order, -1), np.take_along_axis(mask, order, -1)
    seg = np.where(amask != 0, 0, -1).astype(np.int32)
    seg = np.pad(seg, ((0, 0), (0, 34)), constant_values=-1)
    pos = np.broadcast_to(np.maximum(np.cumsum(seg >= 0, 1) - 1, 0), (3, 2, 64)).astype(np.int32)
    x = jnp.pad(encode.embed(m.graphdef, m.state, jnp.asarray(aligned)), ((0, 0), (0, 34), (0, 0)))
    cache = m.new_sparse_cache(2, 128)
    logits, cache = sparse_steps.prefill(
        m.graphdef, m.state, cache, x, jnp.asarray(pos), jnp.asarray(seg), jnp.full((2,), 29, jnp.int32)
    )
    tokens, position = jnp.argmax(logits, -1), jnp.asarray(amask.sum(-1), jnp.int32)
    greedy = [np.asarray(tokens)]
    for _ in range(23):
        logits, cache = sparse_steps.decode_step(m.graphdef, m.state, cache, tokens, position)
        tokens, position = jnp.argmax(logits, -1), position + 1
        greedy.append(np.asarray(tokens))
    np.testing.assert_array_equal(out.sequences[:, 30:], np.stack(greedy, axis=1))


@pytest.mark.slow
def test_load_model_with_sparsity(sparse_model, tmp_path):
    plain = VisionLanguageModel.random(CONFIG, seed=4)
    plain.save(tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt", sparsity=SparsityConfig(streaming_heads=STREAMING, sink=SINK,
                        local=LOCAL, token_budget=16, reselect_every=2, **SMALL))  # fmt: skip
    assert loaded.sparsity == sparse_model.sparsity
    ids = np.arange(3, 23)[None]
    np.testing.assert_array_equal(
        loaded.generate(ids, max_new_tokens=6, eos_token_id=[]), sparse_model.generate(ids, max_new_tokens=6,
                                                                                       eos_token_id=[])
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"shape \(3, 2\)"):
        VisionLanguageModel.random(CONFIG, sparsity=SparsityConfig(streaming_heads=[[True, False]] * 3))
    with pytest.raises(ConfigError, match="no sparsity"):
        plain.new_sparse_cache(1, 16)


@pytest.mark.parametrize("platform, kernel, marker", [("tpu", "tpu", "tpu_custom_call"), ("cuda", "gpu", "triton")])
def test_sparse_steps_lower_for_tpu_and_cuda(platform, kernel, marker):
    cfg = SparsityConfig(streaming_heads=STREAMING, sink=8, local=16, page_size=16, logical_page_size=4,
                         token_budget=32, backend="pallas", kernel=kernel)  # fmt: skip
    m = VisionLanguageModel.random(CONFIG, seed=0, sparsity=cfg)
    cache = jax.eval_shape(lambda: m.new_sparse_cache(1, 512))
    i32 = jnp.int32
    decode = sparse_steps.decode_step.trace(
        m.graphdef, m.state, cache, jax.ShapeDtypeStruct((1,), i32), jax.ShapeDtypeStruct((1,), i32)
    )
    text = decode.lower(lowering_platforms=(platform,)).as_text()
    # per layer: page scores and paged decode for the retrieval head, paged decode for the streaming head
    assert len(re.findall(rf"custom_call @\S*{marker}", text)) == 3 * T_CFG.num_layers
    prefill = sparse_steps.prefill.trace(
        m.graphdef, m.state, cache, jax.ShapeDtypeStruct((1, 64, T_CFG.hidden_size), jnp.float32),
        jax.ShapeDtypeStruct((3, 1, 64), i32), jax.ShapeDtypeStruct((1, 64), i32),
    )  # fmt: skip
    # the streaming heads' window runs on the block-sparse kernel
    assert len(re.findall(rf"custom_call @\S*{marker}", prefill.lower(lowering_platforms=(platform,)).as_text())) == 2
