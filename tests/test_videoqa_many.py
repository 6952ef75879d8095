"""``VideoQA.ask_many``: every question gets the answer ``ask`` gives it alone, from one packed pass behind the
shared memory (dense), or one after the other over it (sparse); the memory's KV bytes are counted once."""

import numpy as np
import pytest
from pipeline_helpers import CONFIG, VIDEO_OPTIONS, model_dir, sample_video

import qv_jax
from qv_jax.attention import SparsityConfig
from qv_jax.cli import main
from qv_jax.errors import ConfigError, InputError
from qv_jax.runtime import VisionLanguageModel

QUESTIONS = (
    "What happens in the video?",
    "Which object falls from the shelf? Answer with the letter of the correct option: (A) a dog (B) a cat.",
    "Why?",
)
SMALL_PAGES = {"page_size": 8, "logical_page_size": 4, "backend": "xla"}


@pytest.mark.slow
def test_ask_many_answers_each_question_like_ask(qa, memory, tmp_path):
    many = qa.ask_many(memory, QUESTIONS, max_new_tokens=6)
    alone = [qa.ask(memory, q, max_new_tokens=6) for q in QUESTIONS]
    for got, expected in zip(many, alone, strict=True):
        np.testing.assert_array_equal(got.token_ids, expected.token_ids)
        assert got.text == expected.text
    # the memory once, then each question's and answer's own tokens
    own = sum(a.kv_bytes - memory.kv_bytes for a in alone)
    assert all(a.kv_bytes == memory.kv_bytes + own for a in many)
    assert many[0].kv_bytes < sum(a.kv_bytes for a in alone)
    with pytest.raises(InputError, match="context"):
        qa.ask_many(memory, ["fine"], max_new_tokens=CONFIG.text.max_position_embeddings)
    from_dir = qa.ask_many(memory.save(tmp_path / "mem"), QUESTIONS[:2], max_new_tokens=6)
    assert "load" in from_dir[0].timings.stages
    for got, expected in zip(from_dir, alone[:2], strict=True):
        np.testing.assert_array_equal(got.token_ids, expected.token_ids)


@pytest.mark.slow
def test_ask_many_with_sparse_decoding_matches_ask(qa, memory):
    streaming = SparsityConfig(
        streaming_heads=[[True, False], [True, False]], sink=4, local=8, token_budget=16, **SMALL_PAGES
    )
    model = VisionLanguageModel.random(CONFIG, seed=1, tokenizer=qa.tokenizer, sparsity=streaming)
    sparse = qv_jax.VideoQA(model, group_frames=8, retention=0.5, **VIDEO_OPTIONS)
    mine = sparse.encode(sample_video())
    many = sparse.ask_many(mine, QUESTIONS[:3], max_new_tokens=8)
    for got, question in zip(many, QUESTIONS[:3], strict=True):
        np.testing.assert_array_equal(got.token_ids, sparse.ask(mine, question, max_new_tokens=8).token_ids)


def test_ask_many_bad_input_raises(qa):
    video = sample_video()  # every check comes before the video is read
    with pytest.raises(InputError, match="non-empty list"):
        qa.ask_many(video, [])
    with pytest.raises(InputError, match="non-empty list"):
        qa.ask_many(video, "one question")
    with pytest.raises(InputError, match="question 1 must be a string"):
        qa.ask_many(video, ["fine", 3])
    with pytest.raises(ConfigError, match="question_attention"):
        qv_jax.VideoQA(qa.model, prune="question_attention", **VIDEO_OPTIONS).ask_many(video, ["fine"])


@pytest.mark.slow
def test_cli_asks_many_questions_in_one_pass(qa, memory, tmp_path, capsys):
    saved = memory.save(tmp_path / "mem")
    listed = tmp_path / "questions.txt"
    listed.write_text(f"{QUESTIONS[1]}\n\n{QUESTIONS[2]}\n")
    args = ["ask", str(saved), "-q", QUESTIONS[0], "--questions", str(listed), "--model", str(model_dir())]
    assert main([*args, "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    for question, answer in zip(QUESTIONS, qa.ask_many(memory, QUESTIONS, max_new_tokens=6), strict=True):
        assert f"Q: {question}\nA: {answer.text}\n" in out
    assert out.count("KV cache at the end") == 1 and "the memory once" in out
    assert main(["ask", str(saved), "--model", str(model_dir())]) == 2
    assert "no question" in capsys.readouterr().err
