"""The model's text decoder run with DuoAttention gates: per KV head, ``α·full + (1 − α)·streaming``.

The decoder's own modules do the work (:meth:`DecoderLayer.project` / :meth:`~DecoderLayer.finish`); only the
attention between them changes, and each layer is rematerialised so memory stays one layer's activations. Both
attentions run on the chunked backend, whose tiles are differentiable on every platform. See docs/duo.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from qv_jax.attention import calls
from qv_jax.attention.backends import AttentionConfig, Backend
from qv_jax.attention.patterns import HeadPattern
from qv_jax.model.qwen2_5_vl import Rope

Array = jax.Array

TRAIN_ATTENTION = AttentionConfig(Backend.CHUNKED)


def _gated_layer(layer_def, layer_state, x_BTD, cos_BTH, sin_BTH, gates_K, *, pattern: HeadPattern):
    layer = nnx.merge(layer_def, layer_state)
    q_BNTH, k_BKTH, v_BKTH = layer.project(x_BTD, Rope(cos_BTH, sin_BTH))
    out_BNTH = calls.self_attention(TRAIN_ATTENTION, q_BNTH, k_BKTH, v_BKTH, causal=True)
    if gates_K is not None:
        stream_BNTH = calls.self_attention(TRAIN_ATTENTION, q_BNTH, k_BKTH, v_BKTH, causal=True, patterns=pattern)
        G = q_BNTH.shape[1] // k_BKTH.shape[1]
        g_N = jnp.repeat(gates_K, G).astype(out_BNTH.dtype)[None, :, None, None]
        out_BNTH = g_N * out_BNTH + (1 - g_N) * stream_BNTH
    return layer.finish(x_BTD, out_BNTH)


def hidden_states(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    x_BTD: Array,
    positions_3BT: Array,
    gates_LK: Array | None = None,
    *,
    sink: int,
    recent: int,
    remat: bool = True,
) -> Array:
    """Final post-norm hidden states ``[B, T, D]`` of input embeddings ``x_BTD`` (text and visual tokens, from
    ``qv_jax.duo.train.sample_inputs``) at M-RoPE ``positions_3BT``; ``gates_LK=None`` is the plain model."""
    model = nnx.merge(graphdef, state)
    rope = model.text.rope(positions_3BT)
    pattern = HeadPattern.streaming(sink, recent)
    for i, layer in enumerate(model.text.layers):
        layer_def, layer_state = nnx.split(layer)
        run = functools.partial(_gated_layer, layer_def, pattern=pattern)
        if remat:
            run = jax.checkpoint(run)
        x_BTD = run(layer_state, x_BTD, rope.cos_BTH, rope.sin_BTH, None if gates_LK is None else gates_LK[i])
    return model.text.norm(x_BTD)


def distill_loss(
    gates_LK: Array,
    graphdef: nnx.GraphDef,
    state: nnx.State,
    x_BTD: Array,
    positions_3BT: Array,
    answer_BT: Array,
    *,
    sink: int,
    recent: int,
    reg: float,
    remat: bool = True,
) -> tuple[Array, Array]:
    """``(loss, distance)``: the mean squared distance of the gated model's hidden states from the plain model's at
    the answer positions (``answer_BT`` 1 there), plus ``reg · mean|α|``. ``remat=False`` keeps every layer's
    activations for the backward pass instead of recomputing them (more memory)."""
    inputs = (graphdef, state, x_BTD, positions_3BT)
    teacher_BTD = jax.lax.stop_gradient(hidden_states(*inputs, sink=sink, recent=recent, remat=False))
    student_BTD = hidden_states(*inputs, gates_LK, sink=sink, recent=recent, remat=remat)
    squared_BT = jnp.sum(jnp.square((student_BTD - teacher_BTD).astype(jnp.float32)), axis=-1)
    weight_BT = answer_BT.astype(jnp.float32)
    distance = jnp.sum(squared_BT * weight_BT) / (jnp.sum(weight_BT) * student_BTD.shape[-1])
    return distance + reg * jnp.mean(jnp.abs(gates_LK)), distance


@functools.partial(jax.jit, static_argnames=("graphdef", "sink", "recent"))
def pattern_distance(graphdef, state, x_BTD, positions_3BT, answer_BT, gates_LK, *, sink: int, recent: int) -> Array:
    """The hidden-state distance of a (0 / 1 or soft) gate pattern, without the regulariser."""
    inputs = (graphdef, state, x_BTD, positions_3BT, answer_BT)
    return distill_loss(gates_LK, *inputs, sink=sink, recent=recent, reg=0.0)[1]


def _scored_layer(layer_def, layer_state, x_BTD, cos_BTH, sin_BTH, answer_BT, *, pattern: HeadPattern):
    layer = nnx.merge(layer_def, layer_state)
    q_BNTH, k_BKTH, v_BKTH = layer.project(x_BTD, Rope(cos_BTH, sin_BTH))
    out_BNTH, lse_full = calls.self_attention(TRAIN_ATTENTION, q_BNTH, k_BKTH, v_BKTH, causal=True, return_lse=True)
    _, lse_stream = calls.self_attention(
        TRAIN_ATTENTION, q_BNTH, k_BKTH, v_BKTH, causal=True, patterns=pattern, return_lse=True
    )
    # the softmax mass inside sink + recent is exp(lse over those keys - lse over all keys)
    outside_BNT = 1.0 - jnp.exp(lse_stream - lse_full)
    weight_BT = answer_BT.astype(jnp.float32)
    outside_N = jnp.sum(outside_BNT * weight_BT[:, None], axis=(0, 2)) / jnp.sum(weight_BT)
    K = k_BKTH.shape[1]
    return layer.finish(x_BTD, out_BNTH), outside_N.reshape(K, -1).mean(axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "sink", "recent"))
def outside_mass(graphdef, state, x_BTD, positions_3BT, answer_BT, *, sink: int, recent: int) -> Array:
    """``[layers, kv_heads]``: the attention mass the answer positions' queries put outside sink + recent, averaged
    over each group's query heads (the training-free score of DuoAttention on the fly)."""
    model = nnx.merge(graphdef, state)
    rope = model.text.rope(positions_3BT)
    pattern = HeadPattern.streaming(sink, recent)
    scores = []
    for layer in model.text.layers:
        layer_def, layer_state = nnx.split(layer)
        x_BTD, score_K = _scored_layer(
            layer_def, layer_state, x_BTD, rope.cos_BTH, rope.sin_BTH, answer_BT, pattern=pattern
        )
        scores.append(score_K)
    return jnp.stack(scores)
