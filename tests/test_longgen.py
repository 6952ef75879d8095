"""LongGen hybrid models: the per-layer config, its patterns and how a checkpoint keeps it (docs/attention.md,
"LongGen hybrid models")."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qv_jax.attention import HeadPattern, SparsityConfig, dot_product_attention
from qv_jax.attention.backends import AttentionConfig
from qv_jax.errors import CheckpointError, ConfigError
from qv_jax.model.qwen2_5_vl import ChunkAttention, random_state
from qv_jax.runtime import VisionLanguageModel, encode, load_model
from qv_jax.runtime import sparse as sparse_steps
from qv_jax.testing import tiny_config

# one model with every kind of layer: sink + window, full with a DuoAttention streaming head, local + strided
KINDS = ("streaming", "full", "strided")
DUO = [[False, False], [False, True], [False, False]]
SINK, LOCAL, LOCAL_BLOCKS, VERT_STRIDE = 4, 12, 1, 2
HYBRID = SparsityConfig(
    layers=KINDS,
    streaming_heads=DUO,
    sink=SINK,
    local=LOCAL,
    local_blocks=LOCAL_BLOCKS,
    vert_stride=VERT_STRIDE,
    block=8,
    page_size=8,
    logical_page_size=4,
    token_budget=None,
)


def config_of(num_layers: int):
    config = tiny_config()
    return dataclasses.replace(config, text=dataclasses.replace(config.text, num_layers=num_layers))


def test_longgen_puts_full_layers_in_the_middle_third():
    assert SparsityConfig.longgen(6).layers == ("streaming",) * 2 + ("full",) * 2 + ("streaming",) * 2
    layers = SparsityConfig.longgen(28, sparse="strided").layers
    assert layers.count("full") == 9 and layers[:9] == ("strided",) * 9 and layers[18:] == ("strided",) * 10
    assert SparsityConfig.longgen(2).layers == ("full", "streaming")
    assert SparsityConfig.longgen(4, full_layers=[0, 3]).layers == ("full", "streaming", "streaming", "full")


def test_layer_patterns_per_head():
    duo = [[False, False], [True, False], [False, False]]
    config = SparsityConfig.longgen(3, sink=4, local=8, streaming_heads=duo)
    dense, stream = HeadPattern.dense(), HeadPattern.streaming(4, 8)
    assert config.layer_patterns(3, 2) == ((stream, stream), (stream, dense), (stream, stream))
    assert config.retrieval_first().layer_patterns(3, 2)[1] == (dense, stream)
    strided = SparsityConfig.longgen(3, sparse="strided", local_blocks=2, vert_stride=4, block=64)
    assert strided.layer_patterns(3, 2)[0] == (HeadPattern.strided(2, 4, 0, 64), HeadPattern.strided(2, 4, 1, 64))
    assert strided.layer_patterns(3, 2)[1] == (dense, dense)
    assert strided.layer_patterns(3, 4, kv_repeat=2)[2][2] == HeadPattern.strided(2, 4, 1, 64)
    assert SparsityConfig().layer_patterns(2, 2) == ((dense, dense), (dense, dense))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SparsityConfig.longgen(0), "num_layers"),
        (lambda: SparsityConfig.longgen(4, sparse="dense"), "sparse must be"),
        (lambda: SparsityConfig.longgen(4, full_layers="top"), "full_layers"),
        (lambda: SparsityConfig.longgen(4, full_layers=[4]), "out of range"),
        (lambda: SparsityConfig.longgen(4, sparse="strided", block=96), "multiple of page_size"),
        (lambda: SparsityConfig.longgen(4, sparse="strided", vert_stride=0), "vert_stride"),
        (lambda: SparsityConfig(layers=("full", "sliding")), "layers must be"),
        (lambda: SparsityConfig(layers="full"), "layers must be"),
        (
            lambda: SparsityConfig(layers=("strided", "full"), streaming_heads=[[True, False], [False, False]]),
            "strided",
        ),
        (lambda: SparsityConfig(layers=("full",), streaming_heads=[[True], [False]]), "layers"),
        (lambda: SparsityConfig.longgen(3).streaming_mask(4, 2), "3 layers"),
        (lambda: SparsityConfig.from_dict({"layers": ["full"], "window": 3}), "unknown"),
        (lambda: SparsityConfig.from_dict({"sink": "x"}), "sink"),
    ],
)
def test_bad_configs_raise_config_error(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_dict_round_trip_is_json():
    config = SparsityConfig.longgen(
        4,
        sparse="strided",
        vert_stride=2,
        block=128,
        streaming_heads=[[False, False], [True, False], [False, False], [False, False]],
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert SparsityConfig.from_dict(data) == config
    assert SparsityConfig.from_dict(data, backend="reference").backend == "reference"


def test_save_and_load_keep_the_architecture(tmp_path):
    duo = [[False, False], [True, False], [False, False]]
    sparsity = SparsityConfig.longgen(3, sink=4, local=8, streaming_heads=duo, token_budget=None)
    model = VisionLanguageModel.random(config_of(3), sparsity=sparsity)
    loaded = load_model(model.save(tmp_path / "hybrid"), tokenizer=False)
    assert loaded.sparsity == model.sparsity
    assert loaded.sparsity.layers == ("streaming", "full", "streaming")
    for a, b in zip(jax.tree.leaves(model.state), jax.tree.leaves(loaded.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # an explicit sparsity= wins over the saved one
    assert load_model(tmp_path / "hybrid", tokenizer=False, sparsity=SparsityConfig()).sparsity.layers is None

    # the command line's sparse options change a saved hybrid's settings and keep its layers
    from argparse import Namespace

    from qv_jax.cli.options import sparsity_config

    flags = dict(model=tmp_path / "hybrid", duo_attention=None, streaming_fraction=None, sink=None, local=16)
    got = sparsity_config(Namespace(**flags, token_budget=256, page_size=None, logical_page_size=None))
    assert got.layers == sparsity.layers and (got.token_budget, got.local, got.sink) == (256, 16, 4)
    # its full layers stream DuoAttention heads already (its weights are in their order): no other pattern
    with pytest.raises(ConfigError, match="already"):
        got.with_duo_heads([[True, True], [False, True], [True, True]])
    plain = SparsityConfig.longgen(3, sink=4, local=8)
    added = plain.with_duo_heads([[True, True], [False, True], [True, True]])
    assert added.streaming_heads == ((False, False), (False, True), (False, False))  # in the full layer only

    config_json = tmp_path / "hybrid" / "config.json"
    data = json.loads(config_json.read_text())
    data["qv_jax_sparsity"]["layers"] = ["full", "nope", "full"]
    config_json.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(tmp_path / "hybrid", tokenizer=False)


def layer_masks(T: int, c: SparsityConfig) -> list[np.ndarray]:
    """Each layer's ``[K, T, T]`` mask of a config like :data:`HYBRID`, written out from LongGen's definitions."""
    q, k = np.arange(T)[:, None], np.arange(T)[None, :]
    window = (k < c.sink) | (q - k < c.local)
    out = []
    for kind, row in zip(KINDS, DUO, strict=True):
        heads = []
        for h, streaming in enumerate(row):
            if kind == "strided":
                qb, kb = q // c.block, k // c.block
                mask = (qb - kb < c.local_blocks) | (kb % c.vert_stride == h % c.vert_stride)
            else:
                mask = window if kind == "streaming" or streaming else np.ones((T, T), bool)
            heads.append(mask & (k <= q))
        out.append(np.stack(heads))
    return out


class MaskedReference:
    """The reference attention over a whole sequence with each layer's per-head mask."""

    def __init__(self, masks):
        self.masks = [jnp.asarray(m)[None] for m in masks]

    def __call__(self, layer, q, k, v):
        return dot_product_attention(q, k, v, causal=True, mask=self.masks[layer])


def text_logits(graphdef, state, ids, handler):
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), (3, *ids.shape))
    return model.text.logits(model.text(model.text.embed_tokens(jnp.asarray(ids)), positions, handler))


@pytest.mark.parametrize("backend", ["chunked", pytest.param("interpret", marks=pytest.mark.slow)])
def test_hybrid_logits_and_gradients_equal_the_masked_reference(backend):
    T = 128
    sparsity = dataclasses.replace(HYBRID, block=16, local=40)
    graphdef, state = random_state(config_of(3), seed=4)
    ids = np.random.default_rng(0).integers(0, 500, (1, T))
    weights = jax.random.normal(jax.random.key(1), (1, T, 512))
    hybrid = ChunkAttention(attention=AttentionConfig(backend), layer_patterns=sparsity.layer_patterns(3, 2))
    reference = MaskedReference(layer_masks(T, sparsity))

    def loss(handler):
        return jax.jit(jax.value_and_grad(lambda st: jnp.sum(text_logits(graphdef, st, ids, handler) * weights)))

    got = np.asarray(text_logits(graphdef, state, ids, hybrid))
    want = np.asarray(text_logits(graphdef, state, ids, reference))
    np.testing.assert_allclose(got, want, atol=1e-4)
    dense = np.asarray(text_logits(graphdef, state, ids, ChunkAttention()))
    assert np.abs(dense - want).max() > 1e-3  # the masks matter

    (_, got_grads), (_, want_grads) = loss(hybrid)(state), loss(reference)(state)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def hybrid_model(seed: int = 5) -> VisionLanguageModel:
    return VisionLanguageModel.random(config_of(3), seed=seed, sparsity=HYBRID)


def greedy_reference(m: VisionLanguageModel, ids: np.ndarray, steps: int) -> np.ndarray:
    """Greedy decoding by a full-sequence forward with the per-layer masks, re-run for every token (over the final
    length: causal masks make a token's logits independent of the slots after it)."""
    total = ids.shape[1] + steps
    reference = MaskedReference(layer_masks(total, HYBRID))
    forward = jax.jit(lambda ids: text_logits(m.graphdef, m.state, ids, reference))
    out = np.zeros((1, total), np.int64)
    out[:, : ids.shape[1]] = ids
    for t in range(ids.shape[1], total):
        out[:, t] = np.asarray(jnp.argmax(forward(out)[:, t - 1], axis=-1))
    return out


@pytest.mark.parametrize("prefill_chunk", [2048, 16])
def test_greedy_decoding_from_the_hybrid_cache_equals_the_reference(prefill_chunk):
    """Streaming, DuoAttention and strided heads over the sparse cache, prefilled whole or in chunks behind earlier
    tokens (a padded last chunk included), decode the tokens of the masked full-sequence reference."""
    m = hybrid_model()
    prompt = np.random.default_rng(1).integers(0, 500, (1, 45))
    got = m.generate(prompt, max_new_tokens=12, eos_token_id=[], prefill_chunk=prefill_chunk)
    np.testing.assert_array_equal(got, greedy_reference(m, prompt, 12))
    reference = MaskedReference(layer_masks(prompt.shape[1], HYBRID))
    np.testing.assert_allclose(m.forward(prompt), text_logits(m.graphdef, m.state, prompt, reference), atol=1e-4)


def test_a_sink_and_window_layer_holds_sink_plus_window_tokens_at_any_length():
    m = hybrid_model()
    ids = np.random.default_rng(2).integers(0, 500, (1, 400))
    cache = m.new_sparse_cache(1, 400)
    x = encode.embed(m.graphdef, m.state, jnp.asarray(ids))
    positions = jnp.broadcast_to(jnp.arange(400), (3, 1, 400))
    for start in range(0, 400, 40):  # one compiled step, chunk after chunk
        chunk = slice(start, start + 40)
        args = (x[:, chunk], positions[:, :, chunk], jnp.zeros((1, 40), jnp.int32))
        _, cache = sparse_steps.prefill(m.graphdef, m.state, cache, *args)
        if start + 40 in (40, 400):
            kept = np.sort(np.asarray(cache.stream_slot[0]))
            np.testing.assert_array_equal(kept, [*range(SINK), *range(start + 40 - LOCAL, start + 40)])
    assert cache.stream_k[0].shape == (1, 2, SINK + LOCAL, 16)  # layer 0: every head streams
    assert cache.k[0].shape[1] == 0 and cache.k[2].shape[1] == 2  # no pages; the strided layer keeps all
    assert cache.nbytes == m.kv_cache_bytes(400)
    # a slot more costs the full layer's retrieval head and the strided layer's two heads, never the streaming layer
    # keys + values; key min / max per 4-slot page for the full layer's retrieval head only; a segment id
    per_slot = 3 * 2 * 16 * 4 + 2 * 16 * 4 // 4 + 4
    assert m.kv_cache_bytes(1024) - m.kv_cache_bytes(512) == 512 * per_slot


@pytest.mark.parametrize("platform, kernel, marker", [("tpu", "tpu", "tpu_custom_call"), ("cuda", "gpu", "triton")])
def test_hybrid_steps_lower_for_tpu_and_cuda(platform, kernel, marker):
    sparsity = dataclasses.replace(HYBRID, block=32, page_size=16, backend="pallas", kernel=kernel)
    m = VisionLanguageModel.random(config_of(3), sparsity=sparsity)
    cache = jax.eval_shape(lambda: m.new_sparse_cache(1, 512))
    i32 = jax.ShapeDtypeStruct((1,), jnp.int32)
    decode = sparse_steps.decode_step.trace(m.graphdef, m.state, cache, i32, i32)
    # paged decode: the streaming layer's heads, the full layer's retrieval and streaming heads, the strided layer
    assert len(re.findall(rf"custom_call @\S*{marker}", decode.lower(lowering_platforms=(platform,)).as_text())) == 4
    prefill = sparse_steps.prefill.trace(
        m.graphdef,
        m.state,
        cache,
        jax.ShapeDtypeStruct((1, 64, 64), jnp.float32),
        jax.ShapeDtypeStruct((3, 1, 64), jnp.int32),
        jax.ShapeDtypeStruct((1, 64), jnp.int32),
    )
    # block-sparse: the two streaming windows and the strided layer's first chunk
    text = prefill.lower(lowering_platforms=(platform,)).as_text()
    assert len(re.findall(rf"custom_call @\S*{marker}", text)) == 3


@pytest.mark.slow
def test_videoqa_answers_from_the_pruned_memory_with_a_hybrid_model(qa, memory):
    """A hybrid whose window and strided blocks reach every token answers exactly like dense decoding from the same
    pruned memory (the memory taken over by the hybrid cache, the question prefilled behind it, decoding); a real
    one answers from less KV."""
    from pipeline_helpers import CONFIG, VIDEO_OPTIONS

    import qv_jax

    small = {"layers": ("strided", "streaming"), "block": 8, "page_size": 8, "logical_page_size": 4}
    see_all = SparsityConfig(sink=0, local=1024, local_blocks=1024, token_budget=None, **small)
    real = SparsityConfig(sink=4, local=8, local_blocks=1, vert_stride=2, token_budget=None, **small)
    question = "What happens in the video?"
    dense = qa.ask(memory, question, max_new_tokens=8)
    answers = [
        qv_jax.VideoQA(
            VisionLanguageModel.random(CONFIG, seed=1, tokenizer=qa.tokenizer, sparsity=sparsity),
            group_frames=8,
            **VIDEO_OPTIONS,
        ).ask(memory, question, max_new_tokens=8)
        for sparsity in (see_all, real)
    ]
    np.testing.assert_array_equal(answers[0].token_ids, dense.token_ids)
    assert 1 <= answers[1].token_ids.size <= 8
    # tokens held: the memory, the question, the answer but its last token; the strided layer keeps them all, the
    # streaming layer sink + window, each for 2 KV heads of keys and values of 16 float32s
    held = int(memory.tokens_per_layer[0]) + qa.tokenizer.question_suffix(question).size + answers[1].token_ids.size - 1
    assert answers[1].kv_bytes == (2 * held + 2 * min(held, 4 + 8)) * 2 * 16 * 4 < dense.kv_bytes
