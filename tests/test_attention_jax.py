"""jax's shipped kernels behind ``attention="jax"`` (TPU splash attention, GPU Pallas ``mha`` and ``gqa`` decode) in
interpret mode against the reference backend, the calls they leave to ours, and the model lowered with them for TPU
and CUDA holding no ``[T, S]`` tensor.

Splash reads a query's row through 128-wide tiles, so the shapes here are a few tiles long.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import lowering
from qv_jax.attention import HeadPattern, sparse_attention
from qv_jax.attention.backends import AttentionConfig, Backend
from qv_jax.attention.calls import decode_attention, memory_attention
from qv_jax.errors import InputError
from qv_jax.kernels import jax_gpu
from qv_jax.testing import tiny_config

DENSE = HeadPattern.dense()
STREAM = HeadPattern.streaming(sink=20, local=90)
TOL = 1e-5

# name: (N, K, T, S, patterns, causal, segment ids)
CASES = {
    "dense_gqa_causal": (4, 2, 200, 200, DENSE, True, None),
    "streaming_and_dense_heads": (4, 2, 256, 256, (STREAM, DENSE), True, None),
    "streaming_no_sink_noncausal": (2, 2, 160, 160, HeadPattern.streaming(sink=0, local=40), False, None),
    "packed_segments_with_padding": (4, 1, 200, 200, DENSE, True, "packed"),
    "vision_windows_noncausal": (2, 2, 144, 144, DENSE, False, "windows"),
    "chunk_behind_cache": (4, 2, 96, 300, (DENSE, STREAM), True, None),
    "dense_chunk_behind_cache": (4, 2, 96, 300, DENSE, True, None),  # one mask for all heads: computed in-kernel
}


def inputs(name, H=64):
    N, K, T, S, patterns, causal, seg_kind = CASES[name]
    B = 2 if seg_kind == "packed" else 1  # the interpreter runs every grid step: one row where one says enough
    rng = np.random.default_rng(len(name))
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((B, N, T, H), (B, K, S, H), (B, K, S, H)))
    seg = None
    if seg_kind == "packed":  # two prompts in row 0 and left padding in row 1
        seg = jnp.asarray(np.array([[0] * 70 + [1] * 130, [-1] * 50 + [3] * 150]))
    elif seg_kind == "windows":
        seg = jnp.asarray(np.arange(S)[None] // 36)
    return q, k, v, patterns, causal, seg


def attend(name, backend, kernel=None):
    q, k, v, patterns, causal, seg = inputs(name)
    return sparse_attention(
        q, k, v, patterns, segment_ids=seg, causal=causal, backend=backend, kernel=kernel, return_lse=True
    )


def assert_close(got, want, tol=TOL):
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape
        finite = np.isfinite(w)
        np.testing.assert_array_equal(np.isfinite(g), finite)
        np.testing.assert_allclose(g[finite], w[finite], atol=tol, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_splash_gives_the_reference_outputs(name):
    assert_close(attend(name, "jax-interpret", "tpu"), attend(name, "reference"))


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[2] == c[3] and c[4] is DENSE])
def test_gpu_mha_gives_the_reference_outputs(name):
    assert_close(attend(name, "jax-interpret", "gpu"), attend(name, "reference"))


def test_splash_memory_call_returns_the_lse_and_zero_for_an_empty_memory():
    """A chunk over a memory with empty slots; row 1's memory holds nothing of its segment (lse -inf, zeros)."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 4, 130, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 2, 384, 64)), jnp.float32) for _ in range(2))
    kv_ids = jnp.asarray(np.stack([np.where(np.arange(384) % 5 == 0, -1, 0), np.full(384, 1)]))
    q_ids = jnp.zeros((2, 130), jnp.int32)
    got = memory_attention(AttentionConfig("jax-interpret", "tpu"), q, k, v, q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    want = memory_attention(AttentionConfig("reference"), q, k, v, q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    assert_close(got, want)
    assert np.all(np.asarray(got[1])[1] == -np.inf) and np.all(np.asarray(got[0])[1] == 0)


def _decode(attention, kv_ids):
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((kv_ids.shape[0], 4, 1, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((kv_ids.shape[0], 2, 256, 64)), jnp.float32) for _ in range(2))
    q_ids = jnp.zeros((kv_ids.shape[0], 1), jnp.int32)
    return decode_attention(attention, q, k, v, kv_segment_ids=jnp.asarray(kv_ids), q_segment_ids=q_ids)


@pytest.mark.parametrize("layout", ["left_padded", "holes"])
def test_gpu_decode_over_a_dense_cache(layout):
    """Left-padded rows go to jax's decode kernel; a row with holes (a pruned memory) falls back to ours."""
    slot = np.arange(256)
    rows = [np.where(slot < 40, -1, 0), np.where(slot < 200, 0, -1)]  # left padding; a row filled up to 200
    if layout == "holes":
        rows[1] = np.where(slot % 3 == 0, -1, 0)
    kv_ids = np.stack(rows)
    start, end, one_run = jax_gpu.visible_runs(jnp.asarray(kv_ids) == 0)
    assert bool(one_run) == (layout == "left_padded")
    if layout == "left_padded":
        assert (np.asarray(start).tolist(), np.asarray(end).tolist()) == ([40, 0], [256, 200])
    want = _decode(AttentionConfig("reference"), kv_ids)
    assert_close(_decode(AttentionConfig("jax-interpret", "gpu"), kv_ids), want)


def test_backend_values_parse_and_pallas_families_need_a_device_or_a_kernel():
    assert AttentionConfig("jax-interpret").for_call("memory")[0] == Backend.JAX_INTERPRET
    assert AttentionConfig("jax", "gpu").kernel == "gpu"
    with pytest.raises(InputError, match="need a TPU or GPU"):
        AttentionConfig("jax")


# per platform and step, the kernels in the lowered module: jax's where one serves the call, ours for the rest
KERNELS = {
    "tpu": {"prefill": {"splash_mha_fwd"}, "group": {"splash_mha_fwd"}, "decode": {"paged_decode_attention"}},
    "cuda": {
        "prefill": {"mha_forward", "block_sparse_attention_fwd"},  # the chunk over itself; over the cache: ours
        "group": {"mha_forward", "block_sparse_attention_fwd"},
        "decode": {"mha_forward", "paged_decode_attention"},  # gqa (named mha_forward), ours where rows have holes
    },
}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_model_lowers_with_jax_kernels_and_no_tokens_by_slots_tensor(platform, tmp_path):
    records = lowering.lower_steps(tiny_config(), platform, backend="jax", tokens=384, memory=1280, hlo_dir=tmp_path)
    assert all(r["lowered"] for r in records), records
    by_step = {r["step"]: r for r in records}
    assert by_step["prefill"]["tensors_with_T_and_S"] == 0 and by_step["group"]["tensors_with_T_and_S"] == 0
    for step, names in KERNELS[platform].items():
        text = (tmp_path / f"{platform}-{step}.mlir").read_text()
        known = ("splash_mha_fwd", "mha_forward", "block_sparse_attention_fwd", "paged_decode_attention")
        found = {n for n in known if re.search(rf'"{n}\w*"', text)}
        assert found == names, (step, found)


@pytest.mark.slow
def test_model_with_splash_gives_the_reference_logits_and_tokens():
    """A padded batch (left padding: negative ids) through the text path, splash running the chunk's attention
    over itself and over the cache: forward logits and greedy tokens of the cached decode equal the reference's."""
    from qv_jax.runtime import VisionLanguageModel

    reference = VisionLanguageModel.random(tiny_config(), seed=3, attention="reference")
    mine = reference.with_attention("jax-interpret", "tpu")
    ids = np.array([[0, 0, 5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    mask = np.array([[0, 0] + [1] * 8, [1] * 10])
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        mine.forward(ids, attention_mask=mask)[valid], reference.forward(ids, attention_mask=mask)[valid], atol=1e-4
    )
    options = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=[])
    np.testing.assert_array_equal(mine.generate(ids, **options), reference.generate(ids, **options))
