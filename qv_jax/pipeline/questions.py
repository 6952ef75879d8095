"""Many questions behind one shared video memory: one packed prefill, one batched decode (``VideoQA.ask_many``).

The questions are packed into one sequence (Prepacking, docs/videoqa.md): every question keeps the positions it
would have alone, its segment id is its index, and its keys / values go into a small *tail* cache of batch 1 while
the :class:`~qv_jax.cache.layered.LayeredKV` memory is only read, never copied. Each token attends to the whole
memory (``memory_attention``) and, causally, to its own question's and answer's tokens in the tail
(``append_attention`` with segment ids); the two are merged by their log-sum-exp. Decoding feeds one token per
question per step as a chunk of ``Q`` tokens, so the memory is read once per step for all answers.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qv_jax.attention import calls
from qv_jax.attention.backends import AttentionConfig
from qv_jax.attention.reference import merge_attention
from qv_jax.cache.dense import KVCache
from qv_jax.cache.layered import LayeredKV
from qv_jax.numeric import round_up
from qv_jax.runtime.generate import DecodeRequest, decode_answer, until_stop
from qv_jax.runtime.packing import bucket
from qv_jax.runtime.sampling import SamplingParams, sampling_loop

Array = jax.Array

# The packed questions are padded to a bucket size of at least this many tokens (one compilation per bucket).
MIN_QUESTION_TOKENS = 32


class SharedMemoryAttention:
    """:class:`~qv_jax.model.KVHandler` of a chunk of packed questions (``segment_ids [1, T]``: question index,
    -1 on padding) over a shared memory, its own tokens written to the ``tail`` cache."""

    def __init__(self, memory: LayeredKV, tail: KVCache, segment_ids_BT: Array, attention: AttentionConfig):
        self.memory = memory
        self.start = tail.length
        self.num_tokens = segment_ids_BT.shape[1]
        self.segment_ids = segment_ids_BT
        self.attention = attention
        self.earlier = jnp.where(jnp.arange(tail.capacity) < self.start, tail.segment_ids, -1)
        self._tail = tail.with_segments(self.start, segment_ids_BT)

    @property
    def cache(self) -> KVCache:
        return dataclasses.replace(self._tail, length=self.start + self.num_tokens)

    def __call__(self, layer: int, q_BNTH: Array, k_BKTH: Array, v_BKTH: Array) -> Array:
        self._tail = self._tail.write(layer, self.start, k_BKTH, v_BKTH)
        held = jnp.where(self.memory.token_index[layer] >= 0, 0, -1).astype(jnp.int32)
        sees = jnp.where(self.segment_ids >= 0, 0, -1)  # every question sees the whole memory
        k_BKSH, v_BKSH = self.memory.k[layer], self.memory.v[layer]
        # a call takes at most as many queries as keys: more questions than memory slots go in pieces
        size = k_BKSH.shape[2]
        pieces = [
            calls.memory_attention(
                self.attention,
                q_BNTH[:, :, t : t + size],
                k_BKSH,
                v_BKSH,
                q_segment_ids=sees[:, t : t + size],
                kv_segment_ids=held,
            )
            for t in range(0, self.num_tokens, size)
        ]
        video = tuple(jnp.concatenate(parts, axis=2) for parts in zip(*pieces, strict=True))
        own = calls.append_attention(
            self.attention,
            q_BNTH,
            k_BKTH,
            v_BKTH,
            self.segment_ids,
            k_memory=self._tail.k[layer],
            v_memory=self._tail.v[layer],
            memory_segment_ids=self.earlier,
        )
        return merge_attention(video, own)[0]


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("tail",))
def prefill_questions(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    memory: LayeredKV,
    tail: KVCache,
    ids_T: Array,
    positions_3T: Array,
    segment_ids_T: Array,
    last_Q: Array,
) -> tuple[Array, KVCache]:
    """The packed questions (``ids_T`` at their own positions) behind ``memory``; float32 logits ``[Q, V]`` at
    every question's last token (chunk indices ``last_Q``) and the tail holding the questions."""
    model = nnx.merge(graphdef, state)
    text = model.text
    handler = SharedMemoryAttention(memory, tail, segment_ids_T[None], model.attention)
    h_BTD = text(text.embed_tokens(ids_T[None]), positions_3T[:, None], handler)
    return text.logits(h_BTD[0, last_Q]), handler.cache


def _decode_step(model, memory: LayeredKV, tail: KVCache, tokens_Q: Array, positions_Q: Array):
    """One token per question (question ``q`` is segment ``q``), all as one chunk of the single row."""
    text = model.text
    segment_ids_1Q = jnp.arange(tokens_Q.shape[0], dtype=jnp.int32)[None]
    handler = SharedMemoryAttention(memory, tail, segment_ids_1Q, model.attention)
    positions_31Q = jnp.broadcast_to(positions_Q[None, None], (3, 1, tokens_Q.shape[0]))
    h_1QD = text(text.embed_tokens(tokens_Q[None]), positions_31Q, handler)
    return text.logits(h_1QD[0]), handler.cache


@functools.partial(jax.jit, static_argnames=("graphdef", "num_steps"), donate_argnames=("tail",))
def decode_questions(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    memory: LayeredKV,
    tail: KVCache,
    tokens_Q: Array,
    positions_Q: Array,
    done_Q: Array,
    rng: Array,
    stop_ids: Array,
    pad_id: Array,
    sampling: SamplingParams,
    *,
    num_steps: int,
) -> tuple[Array, KVCache]:
    """Feed every question's first answer token (``tokens_Q``, at ``positions_Q``) and generate up to
    ``num_steps`` more per question; ``(tokens [Q, num_steps], tail)`` (``pad_id`` after a row's stop)."""
    step = functools.partial(_decode_step, nnx.merge(graphdef, state), memory)
    generated, _, _, tail = sampling_loop(
        step, tail, tokens_Q, positions_Q, done_Q, rng, stop_ids, pad_id, sampling, num_steps=num_steps
    )
    return generated, tail


def questions_answer(model, memory, suffixes: list[np.ndarray], request: DecodeRequest) -> tuple[list[np.ndarray], int]:
    """Answer tokens of every question suffix behind ``memory`` (a :class:`~qv_jax.memory.VideoMemory`) as
    ``model`` (a ``VisionLanguageModel``) runs them, each up to its first stop token (included), and the KV bytes
    the pass held: the memory once, plus every question and every answer token fed back."""
    plan, count = memory.plan, len(suffixes)
    rows = bucket(count)  # padded questions: no tokens, done from the start
    lengths = np.array([s.size for s in suffixes] + [0] * (rows - count), np.int32)
    width = bucket(int(lengths.sum()), MIN_QUESTION_TOKENS)
    ids = np.zeros(width, np.int32)
    positions = np.zeros((3, width), np.int32)
    segment_ids = np.full(width, -1, np.int32)
    last = np.zeros(rows, np.int32)
    offset = 0
    for q, suffix in enumerate(suffixes):
        n = suffix.size
        ids[offset : offset + n] = suffix
        positions[:, offset : offset + n] = plan.text_positions(n)  # the positions it has alone
        segment_ids[offset : offset + n] = q
        last[q] = offset + n - 1
        offset += n
    text = model.config.text
    capacity = round_up(width + rows * (request.max_new_tokens - 1), 128)
    tail = model.make_cache(
        KVCache.create,
        batch=1,
        capacity=capacity,
        num_layers=text.num_layers,
        num_kv_heads=text.num_kv_heads,
        head_dim=text.head_dim,
        dtype=model.dtype,
    )
    cache = model.place(memory.cache)  # a loaded memory arrives on one device
    graphdef, state = model.graphdef, model.state
    with model.mesh_context():
        logits, tail = prefill_questions(
            graphdef, state, cache, tail, *(jnp.asarray(a) for a in (ids, positions, segment_ids, last))
        )
    next_positions = jnp.asarray(plan.text_start + lengths)
    padding = jnp.asarray(np.arange(rows) >= count)
    pad_id = jnp.int32(request.pad_id)

    def loop(tail, first_B, done_B, rng, stop_ids, num_steps):
        with model.mesh_context():
            return decode_questions(
                graphdef, state, cache, tail, first_B, next_positions, done_B | padding, rng, stop_ids, pad_id,
                request.sampling, num_steps=num_steps,
            )  # fmt: skip

    tokens, _ = decode_answer(logits, tail, request, loop)
    answers = [until_stop(row, request.stop_ids) for row in tokens[:count]]
    per_token = 2 * text.num_kv_heads * text.head_dim * jnp.dtype(model.dtype).itemsize * text.num_layers
    held = sum(int(s.size) + a.size - 1 for s, a in zip(suffixes, answers, strict=True))
    return answers, memory.cache.kv_bytes + held * per_token
