"""The attention calls the model makes, each run by the backend an :class:`AttentionConfig` picks for it.

- :func:`self_attention` — a chunk over itself (vision windows and full blocks, a whole prompt);
- :func:`memory_attention` — a chunk over keys that all came before it (a cache, QuickPrefill's memory), masked by
  segment ids only, so an unfilled slot costs nothing where the backend skips empty tiles;
- :func:`append_attention` — a chunk written behind a memory: the two above, merged by their log-sum-exp, which is
  exactly causal attention over ``[memory ; chunk]`` without a ``[T, S]`` mask of the cache's dynamic fill;
- :func:`decode_attention` — one token per row over a cache (the paged decode kernel on TPU / GPU; jax's decode
  kernel on GPU with ``attention="jax"`` where each row's visible slots are one run).

Every call goes down to ``qv_jax.attention.sharded`` (per shard on a mesh) and from there to ``local``. See
docs/attention.md, "Backends".
"""

from __future__ import annotations

import jax

from qv_jax.attention import sharded
from qv_jax.attention.backends import AttentionConfig, Backend, CallKind
from qv_jax.attention.patterns import HeadPattern
from qv_jax.attention.reference import merge_attention

Array = jax.Array

DENSE = HeadPattern.dense()
# slots per page when the paged decode kernel reads a dense cache as pages (caches are sized in multiples of it)
DECODE_PAGE = 128


def self_attention(
    config: AttentionConfig,
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool,
    segment_ids: Array | None = None,
    patterns: HeadPattern | tuple[HeadPattern, ...] = DENSE,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """``q [B, N, T, H]`` over ``k`` / ``v [B, K, T, H]`` of the same tokens.

    ``segment_ids [B, T]``: a token sees only tokens of its id, and a negative id is padding (never seen).
    ``patterns``: one per KV head (or one for all), e.g. the vision windows as a block mask.
    """
    backend, kernel = config.for_call(CallKind.SELF if segment_ids is None else CallKind.SELF_SEGMENTS)
    if backend == Backend.CUDNN and not return_lse and all(p.is_dense for p in _tuple(patterns)):
        return _cudnn(q, k, v, causal=causal)
    # key ids alone: the queries are the same tokens, which lets a kernel that compares one id array serve it
    return sharded.sparse_attention(
        q,
        k,
        v,
        patterns,
        segment_ids,
        causal,
        _block_backend(backend),
        *config.blocks(),
        kernel=kernel,
        return_lse=return_lse,
    )


def memory_attention(
    config: AttentionConfig, q: Array, k: Array, v: Array, *, q_segment_ids: Array, kv_segment_ids: Array
) -> tuple[Array, Array]:
    """``q [B, N, T, H]`` over a memory ``k`` / ``v [B, K, S, H]`` whose every key precedes the queries.

    A query sees the keys of its segment (``q_segment_ids [B, T]``, ``kv_segment_ids [B, S]``); a negative key id
    (padding, an empty or stale slot) is never seen. Returns ``(out, lse [B, N, T])``.
    """
    backend, kernel = config.for_call(CallKind.MEMORY)
    return sharded.sparse_attention(
        q,
        k,
        v,
        DENSE,
        (q_segment_ids, kv_segment_ids),
        False,
        _block_backend(backend),
        *config.blocks(),
        kernel=kernel,
        return_lse=True,
    )


def append_attention(
    config: AttentionConfig,
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array,
    *,
    k_memory: Array,
    v_memory: Array,
    memory_segment_ids: Array,
) -> tuple[Array, Array]:
    """A chunk (``q``, ``k`` / ``v [B, K, T, H]``, ``segment_ids [B, T]``) attending causally to itself and to a
    memory of earlier keys (``k_memory`` / ``v_memory [B, K, S, H]``, ``memory_segment_ids [B, S]``).

    Returns ``(out [B, N, T, H], lse [B, N, T])``: attention over ``[memory ; chunk]``.
    """
    own = self_attention(config, q, k, v, causal=True, segment_ids=segment_ids, return_lse=True)
    earlier = memory_attention(
        config, q, k_memory, v_memory, q_segment_ids=segment_ids, kv_segment_ids=memory_segment_ids
    )
    return merge_attention(earlier, own)


def decode_attention(
    config: AttentionConfig, q: Array, k: Array, v: Array, *, kv_segment_ids: Array, q_segment_ids: Array
) -> tuple[Array, Array]:
    """One query token per row, ``q [B, N, 1, H]``, over a cache ``k`` / ``v [B, K, S, H]`` holding it already.

    A query sees the slots of its segment (``q_segment_ids [B, 1]``, ``kv_segment_ids [B, S]``; negative = never).
    Returns ``(out [B, N, 1, H], lse [B, N, 1])``.
    """
    backend, kernel = config.for_call(CallKind.DECODE)
    B, N, _, H = q.shape
    K, S = k.shape[1], k.shape[2]
    if _block_backend(backend) in (Backend.REFERENCE, Backend.CHUNKED) or S % DECODE_PAGE:
        return memory_attention(config, q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    visible = (kv_segment_ids >= 0) & (kv_segment_ids == q_segment_ids)
    out, lse = sharded.dense_decode_attention(
        q[:, :, 0].reshape(B, K, N // K, H), k, v, visible, page_size=DECODE_PAGE, backend=backend, kernel=kernel
    )
    return out.reshape(B, N, 1, H), lse.reshape(B, N, 1)


def _tuple(patterns) -> tuple[HeadPattern, ...]:
    return (patterns,) if isinstance(patterns, HeadPattern) else tuple(patterns)


def _block_backend(backend: Backend) -> Backend:
    """The block-sparse backend that runs a call cuDNN cannot (patterns, segment ids, log-sum-exp): Pallas."""
    return Backend.PALLAS if backend == Backend.CUDNN else backend


def _cudnn(q: Array, k: Array, v: Array, *, causal: bool) -> Array:
    """cuDNN's fused attention (``jax.nn.dot_product_attention``), which takes ``[B, T, N, H]``."""
    q_BTNH, k_BSKH, v_BSKH = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=causal, implementation="cudnn")
    return out.transpose(0, 2, 1, 3)
