"""Jitted device steps of QuickPrefill over a :class:`~qv_jax.cache.layered.LayeredKV` memory.

:func:`prefill_text` appends text (the prompt prefix, the question) to every layer; :func:`prefill_group` runs one
group of visual tokens over ``[memory ; group]`` and keeps ``keep[l]`` of them per layer, compacted behind the
memory (one compilation per video layout); :func:`decode_loop` generates the answer on device. The group's hidden
states go on through every layer in full: only the stored keys / values are pruned, as in QuickVideo.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qv_jax.attention.backends import AttentionConfig
from qv_jax.cache.layered import AppendAttention, LayeredKV
from qv_jax.pipeline.plan import GroupPlan, PruneRule
from qv_jax.pipeline.scores import select_tokens, token_scores
from qv_jax.runtime.generate import DecodeRequest, decode_answer
from qv_jax.runtime.sampling import SamplingParams, sampling_loop

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TextChunk:
    """Text tokens ``ids [T]`` with positions ``[3, T]``, prompt token indices ``[T]`` and ``valid [T]``
    (False on trailing bucket padding)."""

    ids: Array
    positions: Array
    token_index: Array
    valid: Array


def text_after_video(plan: GroupPlan, ids: np.ndarray, length: int) -> TextChunk:
    """The text after the video (``ids``: the question suffix) padded to ``length`` tokens, at its positions and
    token indices in the whole prompt (the question keeps its original positions, whatever was pruned)."""
    count = ids.size
    return TextChunk(
        ids=np.pad(np.asarray(ids, np.int32), (0, length - count)),
        positions=plan.text_positions(length),
        token_index=plan.suffix_start + np.arange(length, dtype=np.int32),
        valid=np.arange(length) < count,
    )


class GroupPruneAttention(AppendAttention):
    """:class:`~qv_jax.model.KVHandler` of one group: attend over ``[memory ; group]``, keep the best tokens.

    The chunk is the group's ``group_tokens`` tokens, followed — for ``question_attention`` only — by the question
    tokens, whose queries score the group and whose keys are dropped afterwards. Per layer: the whole chunk is
    appended behind the memory and attends (causal by token index), then the ``keep[l]`` best group tokens are
    written back over the chunk's slots in prompt order and the rest of those slots are marked empty.
    """

    def __init__(
        self,
        cache: LayeredKV,
        token_index_BT: Array,
        valid_BT: Array,
        keep: Array,
        *,
        group_tokens: int,
        rule: str,
        max_keep: tuple[int, ...],
        key: Array,
        attention: AttentionConfig,
    ):
        super().__init__(cache, token_index_BT, valid_BT, attention)
        self.valid = valid_BT
        self.keep = keep
        self.n = group_tokens
        self.rule = rule
        self.max_keep = max_keep
        self.key = key

    @property
    def cache(self) -> LayeredKV:
        return dataclasses.replace(self._cache, lengths=self._cache.lengths + self.keep)

    def __call__(self, layer: int, q_BNTH: Array, k_BKTH: Array, v_BKTH: Array) -> Array:
        start, out, lse_BNT = self.append(layer, q_BNTH, k_BKTH, v_BKTH)
        if self.rule == PruneRule.NONE:
            return out
        n = self.n
        question = None
        if self.rule == PruneRule.QUESTION_ATTENTION:
            question = (q_BNTH[:, :, n:], lse_BNT[:, :, n:], self.valid[:, n:])
        scores = token_scores(  # [B, group tokens]
            self.rule,
            k_BKTH[:, :, :n],
            v_BKTH[:, :, :n],
            self.valid[:, :n],
            key=jax.random.fold_in(self.key, layer),
            question=question,
        )
        chosen, kept = select_tokens(scores, self.keep[layer], self.max_keep[layer])  # [B, max_keep]
        k_kept, v_kept = (_gather_tokens(x[:, :, :n], chosen) for x in (k_BKTH, v_BKTH))
        index = jnp.where(kept, jnp.take_along_axis(self.q_index[:, :n], chosen, axis=1), -1)
        emptied = jnp.full((index.shape[0], k_BKTH.shape[2] - index.shape[1]), -1, jnp.int32)
        cache = self._cache.write_kv(layer, start, k_kept, v_kept)
        self._cache = cache.write_index(layer, start, jnp.concatenate([index, emptied], axis=1))
        return out


def _gather_tokens(x_BKTH: Array, index: Array) -> Array:
    """Tokens ``index [B, kept]`` of the token axis: ``[B, K, kept, H]``."""
    x_BTKH = x_BKTH.transpose(0, 2, 1, 3)
    return jnp.take_along_axis(x_BTKH, index[:, :, None, None], axis=1).transpose(0, 2, 1, 3)


@functools.partial(jax.jit, static_argnames=("graphdef", "all_logits"), donate_argnames=("cache",))
def prefill_text(
    graphdef: nnx.GraphDef, state: nnx.State, cache: LayeredKV, chunk: TextChunk, all_logits: bool = False
) -> tuple[Array, LayeredKV]:
    """Append a text chunk to every layer; float32 logits ``[V]`` of its last valid token (``[T, V]`` with
    ``all_logits``) and the updated memory."""
    model = nnx.merge(graphdef, state)
    text = model.text
    handler = AppendAttention(cache, chunk.token_index[None], chunk.valid[None], model.attention)
    h_BTD = text(text.embed_tokens(chunk.ids[None]), chunk.positions[:, None], handler)
    if all_logits:
        return text.logits(h_BTD[0]), handler.cache
    last = jnp.sum(chunk.valid).astype(jnp.int32) - 1
    return text.logits(h_BTD[0, last]), handler.cache


@functools.partial(jax.jit, static_argnames=("graphdef", "rule", "max_keep"), donate_argnames=("cache",))
def prefill_group(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    cache: LayeredKV,
    embeds_TD: Array,
    positions_3T: Array,
    token_index_T: Array,
    valid_T: Array,
    keep: Array,
    key: Array,
    question: TextChunk | None = None,
    *,
    rule: str,
    max_keep: tuple[int, ...],
) -> LayeredKV:
    """Prefill one group's visual embeddings ``[n, D]`` and prune: each layer ``l`` keeps ``keep[l]`` tokens.

    ``positions_3T`` / ``token_index_T`` / ``valid_T`` describe the group's ``n`` slots (padding invalid);
    ``key`` seeds the random rule (folded with the layer); ``question`` rides along for ``question_attention``.
    ``max_keep[l]`` (static) bounds ``keep[l]`` over the video's groups.
    """
    model = nnx.merge(graphdef, state)
    text = model.text
    group_tokens = embeds_TD.shape[0]
    x_BTD = embeds_TD[None].astype(text.dtype)
    positions, index, valid = positions_3T, token_index_T, valid_T
    if question is not None:
        x_BTD = jnp.concatenate([x_BTD, text.embed_tokens(question.ids[None])], axis=1)
        positions = jnp.concatenate([positions, question.positions], axis=1)
        index = jnp.concatenate([index, question.token_index])
        valid = jnp.concatenate([valid, question.valid])
    handler = GroupPruneAttention(
        cache,
        index[None],
        valid[None],
        keep,
        group_tokens=group_tokens,
        rule=rule,
        max_keep=max_keep,
        key=key,
        attention=model.attention,
    )
    text(x_BTD, positions[:, None], handler)  # hidden states are not needed: only the kept keys / values are
    return handler.cache


def _decode_one(model, cache: LayeredKV, tokens_B: Array, where: tuple[Array, Array]) -> tuple[Array, LayeredKV]:
    """One token (a row of one) at rotary position and prompt token index ``where``, appended to every layer."""
    position_B, index_B = where
    text = model.text
    handler = AppendAttention(cache, index_B[:, None], jnp.ones((1, 1), bool), model.attention)
    positions_31B = jnp.broadcast_to(position_B[None, :, None], (3, 1, 1))
    h_B1D = text(text.embed_tokens(tokens_B[:, None]), positions_31B, handler)
    return text.logits(h_B1D[:, 0]), handler.cache


@functools.partial(jax.jit, static_argnames=("graphdef", "num_steps"), donate_argnames=("cache",))
def decode_loop(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    cache: LayeredKV,
    token: Array,
    position: Array,
    index: Array,
    rng: Array,
    stop_ids: Array,
    sampling: SamplingParams,
    *,
    num_steps: int,
) -> tuple[Array, Array, LayeredKV]:
    """Feed ``token`` (already sampled; rotary ``position``, prompt ``index``) and generate up to ``num_steps``
    more tokens, stopping after a token in ``stop_ids``. Returns ``(tokens [num_steps], count, memory)``: the
    first ``count`` entries are the generated tokens (a stop token included)."""
    tokens_B = jnp.asarray(token, jnp.int32)[None]
    generated, _, count, cache = sampling_loop(
        functools.partial(_decode_one, nnx.merge(graphdef, state)),
        cache,
        tokens_B,
        (jnp.asarray(position)[None], jnp.asarray(index)[None]),
        jnp.isin(tokens_B, stop_ids),
        rng,
        stop_ids,
        jnp.zeros((), jnp.int32),
        sampling,
        num_steps=num_steps,
    )
    return generated[0], count, cache


def answer(model, cache: LayeredKV, chunk: TextChunk, where: tuple[int, int], request: DecodeRequest):
    """Prefill a question chunk behind ``cache`` (consumed) and decode the answer, on the
    devices of ``model`` (a ``VisionLanguageModel``). ``where``: the rotary position and prompt token index of the
    first token after the question. Returns ``(token ids, KV bytes the cache held at the end)``."""
    cache = model.place(cache)  # a loaded memory arrives on one device
    with model.mesh_context():
        logits, cache = prefill_text(model.graphdef, model.state, cache, chunk)
    position, index = (jnp.int32(x) for x in where)

    def loop(cache, first_B, done_B, rng, stop_ids, num_steps):
        with model.mesh_context():
            rest, _, cache = decode_loop(
                model.graphdef,
                model.state,
                cache,
                first_B[0],
                position,
                index,
                rng,
                stop_ids,
                request.sampling,
                num_steps=num_steps,
            )
        return rest[None], cache

    tokens, cache = decode_answer(logits[None], cache, request, loop)
    return tokens[0], cache.kv_bytes
