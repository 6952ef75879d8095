"""QuickPrefill: the kept tokens of every score rule against numpy, the memory's exact size, retention 1.0 against
one full prefill of the plain model, and one compiled group step for every group of a video."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pipeline_helpers import VIDEO_OPTIONS, reference_inputs, sample_video, tiny_model

from qv_jax.attention import calls
from qv_jax.attention.backends import AttentionConfig
from qv_jax.cache.layered import AppendAttention, LayeredKV
from qv_jax.pipeline import prefill
from qv_jax.pipeline.prefill import GroupPruneAttention, text_after_video
from qv_jax.videoqa import VideoQA

B, N, K, H = 1, 4, 2, 8
MEMORY, GROUP, PADS, QUESTION = 5, 10, 2, 3  # 5 earlier tokens; a group of 10 slots, the last 2 padding; 3 question
KEEP = (4, 3)  # tokens layer 0 and layer 1 keep of the group's 8
RULES = ["key_norms_small", "key_norms", "value_norms", "random", "question_attention", "none"]


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _memory() -> LayeredKV:
    cache = LayeredKV.create(num_layers=2, capacity=32, num_kv_heads=K, head_dim=H)
    handler = AppendAttention(cache, jnp.arange(MEMORY)[None], jnp.ones((1, MEMORY), bool), AttentionConfig())
    for layer in range(2):
        handler(
            layer,
            _random((B, N, MEMORY, H), 10 + layer),
            *(_random((B, K, MEMORY, H), 20 + 2 * layer + i) for i in range(2)),
        )
    return handler.cache


def _softmax_attention(q_NTH, k_KSH, v_KSH, allowed_TS):
    """numpy attention with GQA; returns output [N, T, H] and probabilities [N, T, S]."""
    k_NSH, v_NSH = (np.repeat(x, N // K, axis=0) for x in (k_KSH, v_KSH))
    logits = np.einsum("NTH,NSH->NTS", q_NTH, k_NSH) / np.sqrt(H)
    logits = np.where(allowed_TS[None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("NTS,NSH->NTH", p, v_NSH), p


@pytest.mark.parametrize("rule", RULES)
def test_kept_tokens_follow_each_score_rule(rule):
    memory = _memory()
    mem_k = [np.asarray(memory.k[layer][0, :, :MEMORY]) for layer in range(2)]
    mem_v = [np.asarray(memory.v[layer][0, :, :MEMORY]) for layer in range(2)]
    tokens = GROUP + (QUESTION + 1 if rule == "question_attention" else 0)  # the question chunk has one pad too
    index = MEMORY + np.arange(tokens)
    valid = np.arange(tokens) < GROUP - PADS
    if rule == "question_attention":
        valid[GROUP:] = np.arange(QUESTION + 1) < QUESTION
    keep = KEEP if rule != "none" else (GROUP - PADS,) * 2
    key = jax.random.key(3)
    handler = GroupPruneAttention(
        memory,
        jnp.asarray(index)[None],
        jnp.asarray(valid)[None],
        jnp.asarray(keep, jnp.int32),
        group_tokens=GROUP,
        rule=rule,
        max_keep=(5, 5) if rule != "none" else (GROUP,) * 2,
        key=key,
        attention=AttentionConfig(),
    )
    for layer in range(2):
        q, k, v = (_random((B, heads, tokens, H), 100 * layer + i) for i, heads in enumerate((N, K, K)))
        out = np.asarray(handler(layer, q, k, v))[0]

        # reference attention over [memory ; chunk], causal by prompt index, padding never seen
        all_k = np.concatenate([mem_k[layer], np.asarray(k)[0]], axis=1)
        all_v = np.concatenate([mem_v[layer], np.asarray(v)[0]], axis=1)
        kv_index = np.concatenate([np.arange(MEMORY), np.where(valid, index, -1)])
        allowed = (kv_index[None] >= 0) & (kv_index[None] <= index[:, None])
        ref_out, probs = _softmax_attention(np.asarray(q)[0], all_k, all_v, allowed)
        np.testing.assert_allclose(out[:, valid], ref_out[:, valid], rtol=1e-5, atol=1e-5)

        group_k, group_v = np.asarray(k)[0][:, :GROUP], np.asarray(v)[0][:, :GROUP]
        if rule == "key_norms_small":
            scores = -np.linalg.norm(group_k.transpose(1, 0, 2).reshape(GROUP, -1), axis=-1)
        elif rule == "key_norms":
            scores = np.linalg.norm(group_k.transpose(1, 0, 2).reshape(GROUP, -1), axis=-1)
        elif rule == "value_norms":
            scores = np.linalg.norm(group_v.transpose(1, 0, 2).reshape(GROUP, -1), axis=-1)
        elif rule == "random":
            scores = np.asarray(jax.random.uniform(jax.random.fold_in(key, layer), (1, GROUP)))[0]
        elif rule == "question_attention":
            question_rows = GROUP + np.flatnonzero(valid[GROUP:])
            scores = probs[:, question_rows][:, :, MEMORY : MEMORY + GROUP].sum(axis=1).mean(axis=0)
        else:
            scores = np.zeros(GROUP)
        scores = np.where(valid[:GROUP], scores, -np.inf)
        expected = np.sort(np.argsort(-scores, kind="stable")[: keep[layer]])

        cache = handler.cache
        slots = np.asarray(cache.token_index[layer, 0])
        np.testing.assert_array_equal(slots[:MEMORY], np.arange(MEMORY))
        np.testing.assert_array_equal(slots[MEMORY : MEMORY + keep[layer]], MEMORY + expected)
        assert (slots[MEMORY + keep[layer] :] == -1).all()
        kept_k = np.asarray(cache.k[layer][0, :, MEMORY : MEMORY + keep[layer]])
        np.testing.assert_array_equal(kept_k, group_k[:, expected])
        kept_v = np.asarray(cache.v[layer][0, :, MEMORY : MEMORY + keep[layer]])
        np.testing.assert_array_equal(kept_v, group_v[:, expected])
    np.testing.assert_array_equal(np.asarray(handler.cache.lengths), MEMORY + np.asarray(keep))


@pytest.mark.parametrize("backend", ["reference", "chunked", "interpret", "jax-interpret"])
def test_a_long_memory_is_read_in_tiles(backend):
    """A group behind a 100-slot memory with empty slots, read in tiles of 16 slots, equals numpy attention over
    ``[memory ; group]``: every held slot, then the group causally, the padding never seen."""
    rng = np.random.default_rng(4)
    S, T = 100, 6
    held = rng.random(S) < 0.8  # compacted memories have holes: dropped tokens, unfilled capacity
    q = _random((B, N, T, H), 3)
    k_mem, v_mem, k, v = (_random((B, K, n, H), seed) for seed, n in ((1, S), (2, S), (5, T), (6, T)))
    chunk_ids = jnp.asarray([[0, 0, 0, 0, 0, -1]], jnp.int32)  # the last token is padding
    config = AttentionConfig(backend, block_q=16, block_kv=16)
    out, _ = calls.append_attention(
        config, q, k, v, chunk_ids, k_memory=k_mem, v_memory=v_mem,
        memory_segment_ids=jnp.asarray(np.where(held, 0, -1)[None], jnp.int32),
    )  # fmt: skip
    all_k = np.concatenate([np.asarray(k_mem)[0], np.asarray(k)[0]], axis=1)
    all_v = np.concatenate([np.asarray(v_mem)[0], np.asarray(v)[0]], axis=1)
    own = np.tril(np.ones((T, T), bool)) & (np.asarray(chunk_ids)[0] >= 0)[None]
    allowed = np.concatenate([np.broadcast_to(held, (T, S)), own], axis=1)
    want, _ = _softmax_attention(np.asarray(q)[0], all_k, all_v, allowed)
    np.testing.assert_allclose(np.asarray(out)[0, :, :-1], want[:, :-1], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.slow
@pytest.mark.parametrize("group_frames, variant", [(4, "qwen2_5_vl"), (8, "qwen2_5_vl"), (8, "qwen2_vl")])
def test_full_retention_matches_one_full_prefill(group_frames, variant):
    """20 frames in groups of 4 (5 groups) or 8 (8 + 8 + 4, the last padded): with every token kept, the question's
    logits and the greedy answer equal one prefill of the whole prompt by the plain model (Qwen2.5-VL, and
    Qwen2-VL with its own position rule)."""
    model = tiny_model(variant=variant)
    video, question = sample_video(), "What happens in the video?"
    qa = VideoQA(model, group_frames=group_frames, retention=1.0, **VIDEO_OPTIONS)
    frame_plan, plan = qa.plan(video)
    assert frame_plan.num_frames == 20 and plan.num_groups == -(-20 // group_frames)
    ref = reference_inputs(model, video, question, frame_plan, plan.grid)
    ref_logits = model.forward(**ref)[0]
    ref_tokens = model.generate(**ref, max_new_tokens=6)[0, ref["input_ids"].shape[1] :]

    memory = qa.encode(video)
    suffix = model.tokenizer.question_suffix(question)
    chunk = text_after_video(plan, suffix, 32)
    cache = memory.cache.padded(memory.cache.capacity + 64)
    logits, cache = prefill.prefill_text(model.graphdef, model.state, cache, chunk, all_logits=True)
    np.testing.assert_allclose(np.asarray(logits)[: suffix.size], ref_logits[plan.suffix_start :], atol=1e-4, rtol=1e-4)

    answer = qa.ask(memory, question, max_new_tokens=6)
    np.testing.assert_array_equal(answer.token_ids, ref_tokens)


@pytest.mark.slow
def test_memory_holds_prefix_kept_tokens_and_question(model):
    """ρ = 0.3 with decay 0.5: layer l keeps ⌈0.3 · 0.5^l · n_g⌉ of group g's n_g tokens; the question adds its own."""
    qa = VideoQA(model, group_frames=8, retention=0.3, layer_decay=0.5, **VIDEO_OPTIONS)
    memory = qa.encode(sample_video())
    plan = memory.plan
    np.testing.assert_array_equal(plan.group_tokens, [64, 64, 32])
    expected = plan.prefix_len + np.array([20 + 20 + 10, 10 + 10 + 5])
    np.testing.assert_array_equal(memory.tokens_per_layer, expected)
    index = np.asarray(memory.cache.token_index)[:, 0]
    for layer in range(2):
        held = index[layer][index[layer] >= 0]
        assert held.size == expected[layer]
        np.testing.assert_array_equal(held[: plan.prefix_len], np.arange(plan.prefix_len))  # never pruned
        assert (np.diff(held) > 0).all()  # prompt order
        for g in range(plan.num_groups):
            start = plan.prefix_len + g * plan.tokens_per_group
            in_group = (held >= start) & (held < start + plan.group_tokens[g])
            assert in_group.sum() == plan.keep[g, layer]
    assert memory.kv_bytes == expected.sum() * 2 * 2 * 16 * 4  # k and v, 2 KV heads of 16, float32

    suffix = model.tokenizer.question_suffix("Which object falls?")
    chunk = text_after_video(plan, suffix, 32)
    _, cache = prefill.prefill_text(model.graphdef, model.state, memory.cache.padded(256), chunk)
    np.testing.assert_array_equal(np.asarray(cache.lengths), expected + suffix.size)
    index = np.asarray(cache.token_index)[:, 0]
    for layer in range(2):
        held = index[layer][index[layer] >= 0]
        np.testing.assert_array_equal(held[-suffix.size :], plan.suffix_start + np.arange(suffix.size))


@pytest.mark.slow
def test_one_compiled_group_step_serves_every_group(model):
    compiles = []
    at_group_end = {}

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    def progress(event):
        if event.stage in ("vision", "prefill") and event.group >= 0:
            at_group_end[(event.stage, event.group)] = len(compiles)

    qa = VideoQA(model, group_frames=6, retention=0.4, **VIDEO_OPTIONS)  # 6 + 6 + 6 + 2: the last group padded
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        memory = qa.encode(sample_video(), progress=progress)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert memory.plan.num_groups == 4
    after_first = at_group_end[("prefill", 0)]
    assert [at_group_end[(s, g)] for g in range(1, 4) for s in ("vision", "prefill")] == [after_first] * 6
