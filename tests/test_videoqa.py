"""VideoQA: one encode answers many questions, a saved memory answers like the in-memory one, memories of other
models are refused, and bad settings or inputs raise typed errors."""

import dataclasses

import jax
import numpy as np
import pytest
from pipeline_helpers import CONFIG, VIDEO_OPTIONS, model_dir, sample_video, tiny_model

import qv_jax
from qv_jax.attention import SparsityConfig
from qv_jax.errors import ConfigError, InputError, MemoryMismatchError
from qv_jax.memory import VideoMemory, is_memory_dir
from qv_jax.model.config import ModelConfig
from qv_jax.runtime import VisionLanguageModel
from qv_jax.videoqa import Answer

QUESTIONS = ("What happens in the video?", "How many people appear?")


@pytest.mark.slow
def test_answers_from_video_memory_and_saved_memory_agree(qa, memory, tmp_path):
    direct = qa.ask(sample_video(), QUESTIONS[0], max_new_tokens=8)
    assert isinstance(direct, Answer)
    assert direct.text == qa.tokenizer.decode(direct.token_ids) and 1 <= direct.token_ids.size <= 8
    for stage in ("probe", "decode", "vision", "prefill", "answer"):
        assert direct.timings.stages[stage] > 0, stage
    assert direct.timings.wall_s > 0 and direct.kv_bytes > memory.kv_bytes

    saved = memory.save(tmp_path / "mem")
    assert is_memory_dir(saved)
    loaded = qv_jax.VideoMemory.load(saved)
    np.testing.assert_array_equal(loaded.tokens_per_layer, memory.tokens_per_layer)
    for a, b in zip(loaded.cache.k, memory.cache.k, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[:, :, : a.shape[2]])
    assert loaded.info == memory.info

    for question in QUESTIONS:
        first = qa.ask(memory, question, max_new_tokens=8)
        again = qa.ask(memory, question, max_new_tokens=8)  # the memory is not used up by answering
        from_disk = qa.ask(loaded, question, max_new_tokens=8)
        from_dir = qa.ask(saved, question, max_new_tokens=8)
        for other in (again, from_disk, from_dir):
            np.testing.assert_array_equal(other.token_ids, first.token_ids)
        assert "load" in from_dir.timings.stages and "decode" not in from_dir.timings.stages
    np.testing.assert_array_equal(qa.ask(memory, QUESTIONS[0], max_new_tokens=8).token_ids, direct.token_ids)


@pytest.mark.slow
def test_memories_of_other_models_are_refused(qa, memory, tmp_path):
    other_weights = qv_jax.VideoQA(tiny_model(seed=2), group_frames=8, **VIDEO_OPTIONS)
    with pytest.raises(MemoryMismatchError, match="other weights"):
        other_weights.ask(memory, QUESTIONS[0])
    bf16 = qv_jax.VideoQA(tiny_model(dtype="bfloat16"), group_frames=8, **VIDEO_OPTIONS)
    with pytest.raises(MemoryMismatchError, match="bfloat16"):
        bf16.ask(memory, QUESTIONS[0])
    wider = dataclasses.replace(CONFIG, text=dataclasses.replace(CONFIG.text, intermediate_size=256))
    other_config = qv_jax.VideoQA(
        VisionLanguageModel.random(wider, seed=1, tokenizer=qa.tokenizer), group_frames=8, **VIDEO_OPTIONS
    )
    saved = memory.save(tmp_path / "mem")
    with pytest.raises(MemoryMismatchError, match=r"text\.intermediate_size"):
        other_config.ask(saved, QUESTIONS[0])


@pytest.mark.slow
def test_from_pretrained_loads_a_checkpoint_and_answers_like_the_model(qa, memory):
    loaded = qv_jax.VideoQA.from_pretrained(model_dir(), group_frames=8, retention=0.5, **VIDEO_OPTIONS)
    assert loaded.fingerprint == qa.fingerprint
    np.testing.assert_array_equal(
        loaded.ask(memory, QUESTIONS[1], max_new_tokens=5).token_ids,
        qa.ask(memory, QUESTIONS[1], max_new_tokens=5).token_ids,
    )


@pytest.mark.slow
def test_question_attention_needs_the_question_and_random_is_reproducible():
    model = tiny_model()
    scored = qv_jax.VideoQA(model, group_frames=8, retention=0.3, prune="question_attention", **VIDEO_OPTIONS)
    with pytest.raises(ConfigError, match="question_attention"):
        scored.encode(sample_video())
    answer = scored.ask(sample_video(), QUESTIONS[0], max_new_tokens=4)
    assert 1 <= answer.token_ids.size <= 4

    memories = [
        qv_jax.VideoQA(model, group_frames=8, retention=0.3, prune="random", seed=seed, **VIDEO_OPTIONS).encode(
            sample_video()
        )
        for seed in (5, 5, 6)
    ]
    index = [np.asarray(m.cache.token_index) for m in memories]
    np.testing.assert_array_equal(index[0], index[1])
    assert not np.array_equal(index[0], index[2])


def test_bad_settings_and_inputs_raise_typed_errors(qa, tmp_path):
    model = tiny_model()
    with pytest.raises(ConfigError, match="group_frames"):
        qv_jax.VideoQA(model, group_frames=5)
    with pytest.raises(ConfigError, match="retention"):
        qv_jax.VideoQA(model, retention=0.0)
    with pytest.raises(ConfigError, match="prune must be one of"):
        qv_jax.VideoQA(model, prune="attention_sum")
    with pytest.raises(ConfigError, match="fps"):
        qv_jax.VideoQA(model, fps=0)
    with pytest.raises(ConfigError, match="no tokenizer"):
        qv_jax.VideoQA(VisionLanguageModel(CONFIG, model.graphdef, model.state))
    with pytest.raises(InputError, match="max_new_tokens"):
        qa.ask(sample_video(), "?", max_new_tokens=0)
    with pytest.raises(InputError, match="no such video file"):
        qa.ask(tmp_path / "missing.mp4", "?")
    with pytest.raises(InputError, match="temperature"):
        qa.ask(sample_video(), "?", do_sample=True, temperature=0.0)
    with pytest.raises(qv_jax.errors.CheckpointError, match="not a saved video memory"):
        VideoMemory.load(tmp_path)


def test_memory_fingerprint_ignores_where_weights_live():
    model = tiny_model()
    qa = qv_jax.VideoQA(model, **VIDEO_OPTIONS)
    host = jax.tree.map(np.asarray, model.state)
    assert qv_jax.VideoQA(VisionLanguageModel(CONFIG, model.graphdef, host, tokenizer=model.tokenizer)).fingerprint == (
        qa.fingerprint
    )
    assert ModelConfig.from_dict(qa.fingerprint.config) == CONFIG


SMALL_PAGES = dict(page_size=8, logical_page_size=4, backend="xla")


@pytest.mark.slow
def test_sparse_decoding_takes_over_the_pruned_memory(qa, memory):
    """A sparsity config that sees everything answers exactly like dense decoding from the same memory; one with
    streaming heads and page selection answers from less KV, and refuses memories of the unreordered model."""
    model = tiny_model()
    see_all = VisionLanguageModel.random(
        CONFIG, seed=1, tokenizer=model.tokenizer, sparsity=SparsityConfig(token_budget=None, **SMALL_PAGES)
    )
    dense_answer = qa.ask(memory, QUESTIONS[0], max_new_tokens=8)
    sparse_qa = qv_jax.VideoQA(see_all, group_frames=8, **VIDEO_OPTIONS)
    np.testing.assert_array_equal(
        sparse_qa.ask(memory, QUESTIONS[0], max_new_tokens=8).token_ids, dense_answer.token_ids
    )

    streaming = SparsityConfig(
        streaming_heads=[[True, False], [False, True]], sink=4, local=8, token_budget=16, **SMALL_PAGES
    )
    sparse = qv_jax.VideoQA.from_pretrained(model_dir(), group_frames=8, sparsity=streaming, **VIDEO_OPTIONS)
    with pytest.raises(MemoryMismatchError, match="heads in another order"):
        sparse.ask(memory, QUESTIONS[0])
    answer = sparse.ask(sample_video(), QUESTIONS[0], max_new_tokens=8)
    assert 1 <= answer.token_ids.size <= 8
    assert answer.kv_bytes < dense_answer.kv_bytes
    with pytest.raises(ConfigError, match="layer_decay"):
        qv_jax.VideoQA(sparse.model, layer_decay=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_every_attention_backend_keeps_the_same_tokens_and_answers(qa, memory, backend):
    """QuickPrefill at retention 0.5 keeps the same tokens, and dense and sparse decoding give the same answers,
    whichever backend runs the attention (the default on CPU is ``chunked``)."""
    other = qv_jax.VideoQA(qa.model.with_attention(backend), qa.config)
    mine = other.encode(sample_video())
    np.testing.assert_array_equal(np.asarray(mine.cache.token_index), np.asarray(memory.cache.token_index))
    for a, b in zip(mine.cache.k, memory.cache.k, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    np.testing.assert_array_equal(
        other.ask(mine, QUESTIONS[0], max_new_tokens=8).token_ids,
        qa.ask(memory, QUESTIONS[0], max_new_tokens=8).token_ids,
    )
    streaming = SparsityConfig(
        streaming_heads=[[True, False], [False, True]], sink=4, local=8, token_budget=16, **SMALL_PAGES
    )
    answers = [
        qv_jax.VideoQA(VisionLanguageModel.random(CONFIG, seed=1, tokenizer=qa.tokenizer, sparsity=streaming,
                                                  attention=attention), group_frames=8, retention=0.5,
                       **VIDEO_OPTIONS).ask(sample_video(), QUESTIONS[0], max_new_tokens=8).token_ids
        for attention in (backend, "chunked")
    ]  # fmt: skip
    np.testing.assert_array_equal(*answers)
