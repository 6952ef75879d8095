"""Live streams (qv_jax.streaming): a bounded memory whose size and per-patch attention do not grow, VideoScan's
eviction and top-k rules against numpy references, and exactness against QuickPrefill where nothing is dropped."""

import dataclasses
import threading

import jax.numpy as jnp
import numpy as np
import pytest
from pipeline_helpers import SIDE, VIDEO_OPTIONS, sample_video, tiny_model

import qv_jax
from qv_jax.attention import SparsityConfig
from qv_jax.errors import ConfigError, InputError
from qv_jax.pipeline import prefill
from qv_jax.pipeline.prefill import TextChunk
from qv_jax.runtime import VisionLanguageModel
from qv_jax.streaming import stream as stream_module
from qv_jax.streaming.step import Bank, rebase
from qv_jax.streaming.stream import POSITION_RESERVE
from qv_jax.video import VideoReader

SMALL = 56  # 2x2 merged tokens per temporal patch


@pytest.fixture(scope="module")
def qa():
    return qv_jax.VideoQA(tiny_model(), group_frames=4, retention=1.0, **VIDEO_OPTIONS)


def random_frames(count: int, side: int = SMALL, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def evict_reference(carriers: list[np.ndarray], capacity: int) -> list[int]:
    """VideoScan's bank rule in numpy: the patch numbers held after each carrier in turn."""
    held: list[int] = []
    for patch in range(len(carriers)):
        held.append(patch)
        if len(held) > capacity:
            unit = [carriers[p] / max(np.linalg.norm(carriers[p]), 1e-12) for p in held]
            cosine = [float(np.dot(unit[i], unit[i + 1])) for i in range(len(held) - 1)]
            del held[int(np.argmax(cosine))]
    return held


def test_eviction_follows_the_rule(qa):
    stream = qa.stream(carriers=4, keep_visual=0, fps=2.0)
    carriers, sizes, attended = [], [], []
    frames = random_frames(60)
    for i in range(0, 60, 2):
        stream.push(frames[i : i + 2], times_s=np.array([i, i + 1]) / 2.0)
        carriers.append(np.asarray(stream.last_step.carrier, np.float64))
        sizes.append(stream.kv_bytes)
        attended.append(int(stream.last_step.attended))
    assert stream.frames_seen == 60 and stream.patches == 30
    prefix = stream._prefix.size
    chunk = 4 + 1  # visual tokens and the carrier
    assert attended[:5] == [prefix + chunk + i for i in range(5)] and set(attended[4:]) == {prefix + 4 + chunk}
    assert len(set(sizes[3:])) == 1 and sizes[2] < sizes[3]  # full from the 4th patch on
    held = evict_reference(carriers, 4)
    np.testing.assert_allclose(stream.carrier_times_s, np.array(held) * 2 / 2.0)
    answer = stream.ask("What is happening?", max_new_tokens=4)
    assert 1 <= answer.token_ids.size <= 4 and answer.kv_bytes > stream.kv_bytes
    assert answer.stream_time_s == 29.5  # the newest frame in the memory


@pytest.mark.slow
def test_memory_and_attention_after_64_patches_equal_those_after_2000(qa):
    """The issue's check: a 64-carrier bank is full after 64 patches and 1,936 patches later holds the same bytes,
    and from the first patch that meets a full bank on, each patch attends to the same number of keys (counted by
    the step, and in the bank's held slots)."""
    stream = qa.stream(carriers=64, keep_visual=0, fps=1.0)
    frames = random_frames(4000, side=28)  # one merged visual token per temporal patch: a chunk of 2 tokens
    prefix, chunk = stream._prefix.size, 1 + 1

    def measure() -> tuple[int, int, int]:
        held = np.sum(np.asarray(stream._bank.kv.token_index)[:, 0] >= 0, axis=-1)  # per layer
        assert len(set(held.tolist())) == 1
        return stream.kv_bytes, int(held[0]), int(stream.last_step.attended)

    stream.push(frames[:126])
    bytes_63, held_63, attended_63 = measure()
    stream.push(frames[126:128])
    bytes_64, held_64, attended_64 = measure()
    stream.push(frames[128:130])  # patch 65: the bank is full before it
    attended_65 = measure()[2]
    assert stream.patches == 65 and (held_63, held_64) == (prefix + 63, prefix + 64) and bytes_63 < bytes_64
    assert (attended_63, attended_64, attended_65) == (prefix + 62 + chunk, prefix + 63 + chunk, prefix + 64 + chunk)
    stream.push(frames[130:])
    assert stream.patches == 2000 and stream.frames_seen == 4000 and stream.rebases == 0
    assert measure() == (bytes_64, held_64, attended_65)
    per_token = 2 * qa.model.config.text.num_kv_heads * qa.model.config.text.head_dim * 4
    assert bytes_64 == (prefix + 64) * per_token * qa.model.config.text.num_layers
    times = stream.carrier_times_s
    assert len(times) == 64 and times[-1] == 3998.0 and len(stream._times) <= 4 * 64


def test_keep_visual_keeps_the_tokens_the_carrier_attends_to_most(qa):
    stream = qa.stream(carriers=3, keep_visual=2, fps=1.0)
    frames = random_frames(12, side=SIDE)  # 16 visual tokens per patch
    for i in range(0, 12, 2):
        stream.push(frames[i : i + 2], times_s=[i, i + 1])
        info = stream.last_step
        scores, kept = np.asarray(info.scores), np.asarray(info.kept)
        assert scores.shape == (qa.model.config.text.num_layers, 16) and (scores >= 0).all()
        assert (scores.sum(axis=1) <= 1 + 1e-5).all()
        reference = np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :2], axis=1)
        np.testing.assert_array_equal(kept, reference)
        layer0 = np.asarray(stream._bank.kv.token_index)[0, 0]
        start = stream._prefix.size + int(info.entry) * 3
        first = stream._token_index(stream.patches - 1)
        np.testing.assert_array_equal(layer0[start : start + 3], [first + kept[0, 0], first + kept[0, 1], first + 16])
    per_token = 2 * qa.model.config.text.num_kv_heads * qa.model.config.text.head_dim * 4
    layers = qa.model.config.text.num_layers
    assert stream.kv_bytes == (stream._prefix.size + 3 * 3) * per_token * layers


@pytest.mark.slow
def test_without_carriers_the_stream_is_quickprefill_at_full_retention(qa, monkeypatch):
    monkeypatch.setattr(stream_module, "GROW_ENTRIES", 8)  # the memory doubles to 16 on the way
    frame_plan, _ = qa.plan(sample_video())
    with VideoReader(sample_video()) as reader:
        decoded = reader.read(frame_plan)
    stream = qa.stream(carriers=None, keep_visual="all", fps=frame_plan.sample_fps)
    stream.push(decoded.frames, times_s=np.arange(len(decoded)) / frame_plan.sample_fps)
    assert stream.patches == len(decoded) // 2 and stream._bank.entries == 16
    memory = qa.encode(sample_video())
    question = "What happens in the video?"
    expected = qa.ask(memory, question, max_new_tokens=8)
    answer = stream.ask(question, max_new_tokens=8)
    np.testing.assert_array_equal(answer.token_ids, expected.token_ids)
    # the question's logits over both memories agree (the answers could agree by chance on a random model)
    suffix = qa.tokenizer.question_suffix(question)
    chunk = TextChunk(
        ids=suffix,
        positions=memory.plan.text_positions(suffix.size),
        token_index=memory.plan.suffix_start + np.arange(suffix.size, dtype=np.int32),
        valid=np.ones(suffix.size, bool),
    )
    m = qa.model
    assert stream._text_start == memory.plan.text_start
    capacity = max(stream._bank.kv.capacity, memory.cache.capacity) + 128  # one compilation for both
    ours, _ = prefill.prefill_text(m.graphdef, m.state, stream._bank.kv.padded(capacity), chunk, all_logits=True)
    theirs, _ = prefill.prefill_text(m.graphdef, m.state, memory.cache.padded(capacity), chunk, all_logits=True)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=2e-4, rtol=1e-4)


def test_questions_from_another_thread_while_frames_arrive(qa):
    stream = qa.stream(carriers=4, fps=1.0)
    stream.push(random_frames(2), times_s=[0, 1])
    answers, errors = [], []

    def asker():
        try:
            for _ in range(3):
                answers.append(stream.ask("What now?", max_new_tokens=2))
        except Exception as e:  # reported to the test below
            errors.append(e)

    thread = threading.Thread(target=asker)
    thread.start()
    for i in range(2, 30, 2):
        stream.push(random_frames(2, seed=i), times_s=[i, i + 1])
    thread.join(timeout=120)
    assert not thread.is_alive() and not errors and len(answers) == 3
    assert stream.frames_seen == 30 and len(stream.carrier_times_s) == 4


def test_fps_sampling_and_bad_input(qa):
    stream = qa.stream(carriers=4, fps=1.0)
    stream.push(random_frames(8), times_s=[0, 0.5, 1.0, 1.2, 2.0, 2.9, 3.1, 3.5])
    assert (stream.frames_seen, stream.frames_skipped, stream.patches) == (4, 4, 2)
    with pytest.raises(InputError, match="no complete temporal patch"):
        qa.stream().ask("Anything?")
    with pytest.raises(InputError, match="multiples of 28"):
        qa.stream().push(random_frames(2, side=50))
    with pytest.raises(InputError, match="uint8"):
        stream.push(np.zeros((2, SMALL, SMALL, 3), np.float32))
    with pytest.raises(InputError, match="in a stream of"):
        stream.push(random_frames(2, side=SIDE), times_s=[10, 11])
    for bad in ({"carriers": 1}, {"keep_visual": -1}, {"carriers": None}, {"fps": 0}):
        with pytest.raises(ConfigError):
            qa.stream(**bad)
    sparse = VisionLanguageModel.random(
        qa.model.config, tokenizer=qa.tokenizer, sparsity=SparsityConfig(sink=4, local=8, token_budget=None)
    )
    with pytest.raises(ConfigError, match="without sparsity= to stream"):
        qv_jax.VideoQA(sparse).stream()


@pytest.mark.slow
def test_a_patch_larger_than_the_bank(qa):
    stream = qa.stream(carriers=2, fps=1.0)  # 2 entries of 1 slot behind the prompt; 36 visual tokens a patch
    stream.push(random_frames(6, side=168))
    prefix = stream._prefix.size
    assert stream.patches == 3 and int(stream.last_step.attended) == prefix + 2 + 36 + 1
    per_token = 2 * qa.model.config.text.num_kv_heads * qa.model.config.text.head_dim * 4
    assert stream.kv_bytes == (prefix + 2) * per_token * qa.model.config.text.num_layers


def test_a_stream_past_the_position_range_moves_its_bank_back(qa):
    stream = qa.stream(carriers=4, fps=0.001)  # 4000 temporal positions per patch: 32768 pass after 8 patches
    stream.push(random_frames(40), times_s=np.arange(40) * 1000.0)
    limit = qa.model.config.text.max_position_embeddings
    assert stream.rebases >= 2 and stream._text_start + POSITION_RESERVE <= limit
    assert len(stream.carrier_times_s) == 4 and stream.kv_bytes > 0
    assert stream.ask("Still there?", max_new_tokens=2).token_ids.size >= 1


def test_rebase_rotates_keys_to_their_earlier_temporal_positions():
    from qv_jax.cache.layered import LayeredKV
    from qv_jax.model.qwen2_5_vl import mrope

    m = tiny_model()
    cfg = m.config.text
    prefix, unit, entries = 3, 2, 4
    S = prefix + unit * entries
    rng = np.random.default_rng(0)
    raw = [rng.standard_normal((1, cfg.num_kv_heads, S, cfg.head_dim)).astype(np.float32) for _ in range(2)]
    positions = rng.integers(5000, 9000, (3, 1, S)).astype(np.int32)
    kv = LayeredKV.create(num_layers=cfg.num_layers, capacity=S, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    rotated = tuple(mrope(cfg, positions, np.float32).apply(r) for r in raw)
    kv = dataclasses.replace(kv, k=rotated, token_index=jnp.zeros_like(kv.token_index), lengths=kv.lengths + S)
    patch = jnp.asarray([0, 1, 2, 3], jnp.int32)
    bank = Bank(kv=kv, emb=jnp.zeros((entries, cfg.hidden_size)), patch=patch, count=jnp.int32(entries))
    moved = rebase(m.graphdef, m.state, bank, jnp.int32(4000), jnp.int32(1), prefix=prefix, unit=unit)
    expected = positions.copy()
    expected[0, :, prefix:] -= 4000
    for layer, r in enumerate(raw):
        want = np.asarray(mrope(cfg, expected, np.float32).apply(r))
        np.testing.assert_allclose(np.asarray(moved.kv.k[layer]), want, atol=2e-4)
    index = np.asarray(moved.kv.token_index)[0, 0]
    assert (index[: prefix + unit] == [0] * prefix + [-1] * unit).all() and (index[prefix + unit :] == 0).all()
    assert np.asarray(moved.patch).tolist() == [-1, 1, 2, 3] and int(moved.count) == 3
