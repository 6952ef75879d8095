"""Runtime: sampling against transformers' logits warpers, the generation loop (stop tokens, chunked prefill,
sampling), input errors, and the random-weight path that needs neither torch nor a checkpoint."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from qv_jax.cache import KVCache
from qv_jax.errors import InputError
from qv_jax.model.preprocess import patchify
from qv_jax.model.qwen2_5_vl import random_state
from qv_jax.runtime import SamplingParams, VisionLanguageModel
from qv_jax.runtime.sampling import filter_logits, sample
from qv_jax.testing import tiny_config

CONFIG = tiny_config()


@pytest.fixture(scope="module")
def model():
    return VisionLanguageModel.random(CONFIG, seed=1)


def _video_prompt(grid=(2, 4, 4), before=(5, 6), after=(7, 8)):
    n = int(np.prod(grid)) // 4
    block = [CONFIG.vision_start_token_id, *[CONFIG.video_token_id] * n, CONFIG.vision_end_token_id]
    return [*before, *block, *after]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 8, 0.6)])
def test_filter_matches_transformers_warpers(temperature, top_k, top_p):
    logits = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32) * 3
    ref = torch.from_numpy(logits)
    ref = TemperatureLogitsWarper(temperature)(None, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    got = np.asarray(filter_logits(jnp.asarray(logits), temperature=temperature, top_k=top_k, top_p=top_p))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref.numpy()))
    kept = np.isfinite(got)
    np.testing.assert_allclose(got[kept], ref.numpy()[kept], rtol=1e-6)


def test_sampling_draws_only_kept_tokens_and_is_reproducible():
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((2, 30)), jnp.float32)
    top3 = SamplingParams(do_sample=True, temperature=1.0, top_k=3, top_p=1.0)
    allowed = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    draws = np.stack([np.asarray(sample(logits, jax.random.key(i), top3)) for i in range(64)])
    for b in range(2):
        assert set(draws[:, b]) <= set(allowed[b]) and len(set(draws[:, b])) > 1
    again = np.asarray(sample(logits, jax.random.key(5), top3))
    np.testing.assert_array_equal(again, draws[5])
    top1 = sample(logits, jax.random.key(0), SamplingParams(do_sample=True, temperature=1.0, top_k=1, top_p=1.0))
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(logits).argmax(-1))


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_sampling_parameters_raise(kwargs):
    with pytest.raises(InputError):
        SamplingParams(do_sample=True, **kwargs)


def test_generation_stops_per_row_and_pads_after_the_stop(model):
    ids = np.array([[3, 4, 5, 6], [7, 8, 9, 10]])
    free = model.generate(ids, max_new_tokens=6, eos_token_id=[])[:, 4:]
    stop = int(free[0, 1])
    got = model.generate(ids, max_new_tokens=6, eos_token_id=[stop], pad_token_id=0)[:, 4:]
    expected = free.copy()
    ends = []
    for b in range(2):
        hits = np.flatnonzero(free[b] == stop)
        end = hits[0] + 1 if len(hits) else free.shape[1]
        expected[b, end:] = 0
        ends.append(end)
    np.testing.assert_array_equal(got, expected[:, : max(ends)])


@pytest.mark.slow
def test_chunked_prefill_generates_the_same_tokens(model):
    ids = np.array([_video_prompt(after=tuple(range(20, 60)))])
    frames = np.random.default_rng(2).integers(0, 256, (4, 56, 56, 3), np.uint8)
    pixels, grid = patchify(jnp.asarray(frames), CONFIG.vision)
    vision = {"pixel_values_videos": np.asarray(pixels), "video_grid_thw": np.array(grid), "second_per_grid_ts": [0.5]}
    whole = model.generate(ids, max_new_tokens=5, eos_token_id=[], **vision)
    chunked = model.generate(ids, max_new_tokens=5, eos_token_id=[], prefill_chunk=16, **vision)
    np.testing.assert_array_equal(chunked, whole)
    sampled = model.generate(ids, max_new_tokens=5, eos_token_id=[], do_sample=True, top_k=1, **vision)
    np.testing.assert_array_equal(sampled, whole)


def test_bad_inputs_raise_input_errors(model):
    ids = np.array([_video_prompt()])
    pixels = np.zeros((2 * 4 * 4, CONFIG.vision.patch_dim), np.float32)
    one_pad_short = np.delete(ids, 3, axis=1)
    with pytest.raises(InputError, match="make 8 tokens but input_ids hold 7"):
        model.forward(one_pad_short, pixel_values_videos=pixels, video_grid_thw=[(1, 4, 4)] * 2)
    with pytest.raises(InputError, match="no video pixels"):
        model.forward(ids)
    with pytest.raises(InputError, match="without video_grid_thw"):
        model.forward(ids, pixel_values_videos=pixels)
    with pytest.raises(InputError, match="pixel values"):
        model.forward(ids, pixel_values_videos=pixels[:-1], video_grid_thw=[(2, 4, 4)])
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.forward(np.array([[1, CONFIG.text.vocab_size]]))
    with pytest.raises(InputError, match="masks every token"):
        model.generate(np.array([[1, 2]]), attention_mask=np.array([[0, 0]]))
    with pytest.raises(InputError, match="max_new_tokens"):
        model.generate(np.array([[1, 2]]), max_new_tokens=0)
    with pytest.raises(InputError, match="positive"):
        KVCache.create(num_layers=2, batch=1, capacity=0, num_kv_heads=2, head_dim=8)


def test_random_state_follows_the_initialisers():
    graphdef, state = random_state(CONFIG, jnp.bfloat16, seed=0)
    flat = {tuple(p): np.asarray(v.get_value(), np.float32) for p, v in nnx.to_flat_state(state)}
    assert {v.get_value().dtype for _, v in nnx.to_flat_state(state)} == {jnp.dtype(jnp.bfloat16)}
    assert np.all(flat[("text", "layers", 0, "input_norm", "scale")] == 1)
    assert np.all(flat[("vision", "blocks", 1, "attn", "qkv_bias")] == 0)
    assert abs(flat[("text", "embed")].std() - 0.02) < 0.002
    # a fresh seed gives other weights; the same seed the same ones
    other = nnx.to_flat_state(random_state(CONFIG, jnp.bfloat16, seed=1)[1])
    same = nnx.to_flat_state(random_state(CONFIG, jnp.bfloat16, seed=0)[1])
    embed = {tuple(p): np.asarray(v.get_value(), np.float32) for p, v in other}[("text", "embed")]
    assert not np.array_equal(embed, flat[("text", "embed")])
    np.testing.assert_array_equal(
        {tuple(p): np.asarray(v.get_value(), np.float32) for p, v in same}[("text", "embed")], flat[("text", "embed")]
    )
    assert graphdef == random_state(CONFIG, jnp.bfloat16)[0]


def test_parameters_name_the_model_axis_for_tensor_parallel_layouts(model):
    specs = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.get_partition_spec(model.state))}
    assert specs[("text", "layers", 0, "q")] == jax.sharding.PartitionSpec(None, "model", None)
    assert specs[("text", "layers", 0, "o")] == jax.sharding.PartitionSpec("model", None, None)
    assert specs[("text", "layers", 0, "mlp", "down")] == jax.sharding.PartitionSpec("model", None)
    assert specs[("text", "embed")] == jax.sharding.PartitionSpec("model", None)
    assert specs[("vision", "blocks", 0, "attn", "qkv")] == jax.sharding.PartitionSpec(None, None, "model", None)
    assert specs[("text", "norm", "scale")] == jax.sharding.PartitionSpec(None)


def test_bfloat16_model_tracks_float32(model):
    """The bf16 path (params, activations and cache in bf16; norms, softmax and logits in f32) stays close."""
    half = VisionLanguageModel.random(CONFIG, dtype="bfloat16", seed=1)
    assert half.dtype == jnp.bfloat16 and half.new_cache(1, 8).k[0].dtype == jnp.bfloat16
    ids = np.array([_video_prompt()])
    frames = np.random.default_rng(3).integers(0, 256, (4, 56, 56, 3), np.uint8)
    pixels, grid = patchify(jnp.asarray(frames), CONFIG.vision)
    vision = {"pixel_values_videos": np.asarray(pixels), "video_grid_thw": np.array(grid)}
    full, low = model.forward(ids, **vision), half.forward(ids, **vision)
    assert low.dtype == np.float32
    np.testing.assert_allclose(low, full, atol=0.05 * np.abs(full).max())
    assert half.generate(ids, max_new_tokens=2, eos_token_id=[], **vision).shape == (1, ids.shape[1] + 2)


@pytest.mark.slow
def test_random_model_saves_and_loads_without_torch(tmp_path):
    """The demo path: config -> random weights + test tokenizer -> qv-jax checkpoint -> load_model, torch-free."""
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import qv_jax
        from qv_jax.runtime import VisionLanguageModel
        from qv_jax.testing import tiny_config, write_tokenizer

        config = tiny_config()
        write_tokenizer(r"{tmp_path}/tok", config)
        m = VisionLanguageModel.random(config, seed=3)
        m.save(r"{tmp_path}/ckpt", tokenizer_dir=r"{tmp_path}/tok")
        loaded = qv_jax.load_model(r"{tmp_path}/ckpt")
        assert loaded.config == config and loaded.tokenizer is not None
        ids = np.array([loaded.tokenizer.encode("hello video")])
        np.testing.assert_array_equal(loaded.forward(ids), m.forward(ids))
        out = loaded.generate(ids, max_new_tokens=3, eos_token_id=[])
        assert out.shape == (1, ids.shape[1] + 3)
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
