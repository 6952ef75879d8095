"""The decoder over a chunk of tokens through any KV handler, and the jitted steps built from it.

The functional NNX pattern: a model is split once (``graphdef, state = nnx.split(model)``) and every step merges
them inside ``jit`` with ``graphdef`` static, so each step compiles once per input shape. :func:`jitted_steps` turns
a cache's KV handlers into ``(prefill, decode_step, decode_loop)`` with the cache donated (updated in place):
``qv_jax.runtime.dense`` and ``qv_jax.runtime.sparse`` are those steps over their caches. :func:`forward` runs a
whole prompt without a cache.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from qv_jax.attention.patterns import HeadPattern
from qv_jax.model.qwen2_5_vl import ChunkAttention, KVHandler, QwenVL
from qv_jax.runtime.sampling import SamplingParams, sampling_loop

Array = jax.Array
Cache = TypeVar("Cache")


@functools.partial(jax.jit, static_argnames=("graphdef", "layer_patterns"))
def forward(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    x_BTD: Array,
    positions_3BT: Array,
    segment_ids_BT: Array,
    layer_patterns: tuple[tuple[HeadPattern, ...], ...] | None = None,
) -> Array:
    """Float32 logits ``[B, T, V]`` of a whole prompt, no cache (``segment_ids`` negative on padding), each layer
    attending with its ``layer_patterns`` (``None``: densely)."""
    model = nnx.merge(graphdef, state)
    handler = ChunkAttention(segment_ids_BT, model.attention, layer_patterns)
    return model.text.logits(model.text(x_BTD, positions_3BT, handler))


def prefill_chunk(
    model: QwenVL,
    handler_type: Callable[[Cache, Array], KVHandler],
    cache: Cache,
    x_BTD: Array,
    positions_3BT: Array,
    segment_ids_BT: Array,
    logits_index_B: Array | None = None,
    all_logits: bool = False,
) -> tuple[Array, Cache]:
    """The decoder over a chunk through the KV handler ``handler_type(cache, segment_ids_BT, attention)``: float32
    logits (as
    :func:`prefill` returns them) and the updated cache (the handler's ``.cache``). Shared by the dense and the
    sparse (``qv_jax.runtime.sparse``) steps."""
    handler = handler_type(cache, segment_ids_BT, model.attention)
    h_BTD = model.text(x_BTD, positions_3BT, handler)
    if all_logits:
        return model.text.logits(h_BTD), handler.cache
    if logits_index_B is None:
        h_BD = h_BTD[:, -1]
    else:
        h_BD = jnp.take_along_axis(h_BTD, logits_index_B[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    return model.text.logits(h_BD), handler.cache


def decode_tokens(
    model: QwenVL, handler_type: Callable[[Cache, Array], KVHandler], cache: Cache, tokens_B: Array, positions_B: Array
) -> tuple[Array, Cache]:
    """One text token per row (segment 0) at rotary position ``positions_B`` through :func:`prefill_chunk`."""
    x_B1D = model.text.embed_tokens(tokens_B[:, None])
    positions_31B = jnp.broadcast_to(positions_B[None, :, None], (3, tokens_B.shape[0], 1))
    return prefill_chunk(model, handler_type, cache, x_B1D, positions_31B, jnp.zeros_like(tokens_B, jnp.int32)[:, None])


def _prefill(
    handler_type: Callable[[Cache, Array], KVHandler],
    graphdef: nnx.GraphDef,
    state: nnx.State,
    cache: Cache,
    x_BTD: Array,
    positions_3BT: Array,
    segment_ids_BT: Array,
    logits_index_B: Array | None = None,
    all_logits: bool = False,
) -> tuple[Array, Cache]:
    """Run a chunk of ``T`` embeddings at the cache's fill offset; the cache advances by ``T`` slots.

    Returns float32 logits ``[B, T, V]`` with ``all_logits``, else ``[B, V]`` at chunk index ``logits_index_B``
    (default: the last token), and the updated cache. Needs ``cache.length + T <= cache.capacity``.
    """
    model = nnx.merge(graphdef, state)
    return prefill_chunk(model, handler_type, cache, x_BTD, positions_3BT, segment_ids_BT, logits_index_B, all_logits)


def _decode_step(
    handler_type: Callable[[Cache, Array], KVHandler],
    graphdef: nnx.GraphDef,
    state: nnx.State,
    cache: Cache,
    tokens_B: Array,
    positions_B: Array,
) -> tuple[Array, Cache]:
    """One text token per row (segment 0) at rotary position ``positions_B`` -> float32 logits ``[B, V]``."""
    return decode_tokens(nnx.merge(graphdef, state), handler_type, cache, tokens_B, positions_B)


def _decode_loop(
    handler_type: Callable[[Cache, Array], KVHandler],
    graphdef: nnx.GraphDef,
    state: nnx.State,
    cache: Cache,
    tokens_B: Array,
    positions_B: Array,
    done_B: Array,
    rng: Array,
    stop_ids: Array,
    pad_id: Array,
    sampling: SamplingParams,
    *,
    num_steps: int,
) -> tuple[Array, Array, Cache]:
    """Feed ``tokens_B`` (already sampled) and generate up to ``num_steps`` more tokens per row on device.

    A row is done once it has produced one of ``stop_ids``; its later tokens are ``pad_id``. The loop ends early
    when every row is done. Returns ``(tokens [B, num_steps], done [B], cache)``; columns after an early end hold
    ``pad_id``. Needs ``num_steps`` free cache slots. ``do_sample`` is the static part of ``sampling``.
    """
    step = functools.partial(decode_tokens, nnx.merge(graphdef, state), handler_type)
    generated, done_B, _, cache = sampling_loop(
        step, cache, tokens_B, positions_B, done_B, rng, stop_ids, pad_id, sampling, num_steps=num_steps
    )
    return generated, done_B, cache


def jitted_steps(
    prefill_handler: Callable[[Cache, Array], KVHandler], decode_handler: Callable[[Cache, Array], KVHandler]
) -> tuple[Callable, Callable, Callable]:
    """``(prefill, decode_step, decode_loop)`` through the given KV handlers, jitted with ``graphdef`` and the
    flags static and the cache donated (see :func:`_prefill`, :func:`_decode_step`, :func:`_decode_loop`)."""
    donate = {"donate_argnames": ("cache",)}
    return (
        jax.jit(functools.partial(_prefill, prefill_handler), static_argnames=("graphdef", "all_logits"), **donate),
        jax.jit(functools.partial(_decode_step, decode_handler), static_argnames=("graphdef",), **donate),
        jax.jit(functools.partial(_decode_loop, decode_handler), static_argnames=("graphdef", "num_steps"), **donate),
    )
