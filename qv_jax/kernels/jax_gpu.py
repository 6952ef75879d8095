"""jax's shipped GPU Pallas (Triton) kernels in our layout: ``attention.mha`` for a dense chunk over itself and
``decode_attention.gqa`` for one decode token over a dense cache whose visible slots are one run per row.

- :func:`mha_attention`: ``q [B, N, T, H]`` over ``k`` / ``v [B, K, T, H]`` of the same tokens, causal or not,
  with one segment id per token (``mha`` compares a query's id with a key's). ``mha`` has no GQA: each KV head is
  repeated for its ``G`` query heads (``G`` times the K/V bytes, written once per call).
- :func:`decode_attention`: ``q [B, K, G, H]`` over ``k`` / ``v [B, K, S, H]`` where row ``b`` sees slots
  ``[start_b, end_b)`` (``gqa``'s ``start_idx`` / ``kv_seq_len``): a left-padded cache. A row whose visible slots
  are not one run (a pruned memory, packed rows) cannot be said that way: the caller's ``fallback`` runs instead,
  chosen on device with ``lax.cond``.

Both return the log-sum-exp. Forward only. See docs/attention.md, "jax's kernels".
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from qv_jax.errors import ConfigError
from qv_jax.kernels.padding import next_pow2, pad_axis

try:  # moved in and out of jax.experimental across releases: a clear error instead of an ImportError at import
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention
    from jax.experimental.pallas.ops.gpu import decode_attention as gpu_decode
except ImportError:  # pragma: no cover - only on jax releases without them
    gpu_attention = gpu_decode = None

TILE = 128  # mha's default tiles; the decode kernel's key tile
MAX_SPLITS = 16  # gqa's default split-K


def _check():
    if gpu_attention is None:  # pragma: no cover - only on jax releases without them
        raise ConfigError(
            f"attention='jax' on GPU needs jax.experimental.pallas.ops.gpu.attention / decode_attention, which jax "
            f"{jax.__version__} does not ship; use attention='pallas'"
        )


def mha_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    *,
    causal: bool,
    scale: float,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``(out [B, N, T, H], lse [B, N, T] float32)``; a negative id's query gets zeros and ``lse = -inf``."""
    _check()
    B, N, T, _ = q.shape
    G = N // k.shape[1]
    # mha's tiles are min(128, length) and must divide it; Triton wants powers of two
    Tp = -(-T // TILE) * TILE if T > TILE else max(16, next_pow2(T))
    if segment_ids is None and not causal and Tp != T:
        segment_ids = jnp.zeros((B, T), jnp.int32)  # padded keys are later than every query when causal
    ids = None if segment_ids is None else pad_axis(segment_ids.astype(jnp.int32), 1, Tp, value=-1)
    q_BTNH = pad_axis(q, 2, Tp).transpose(0, 2, 1, 3)
    k_BTNH, v_BTNH = (pad_axis(jnp.repeat(x, G, axis=1), 2, Tp).transpose(0, 2, 1, 3) for x in (k, v))
    tile = min(TILE, Tp)
    out_BTNH, lse2 = gpu_attention.mha(
        q_BTNH, k_BTNH, v_BTNH, ids, sm_scale=scale, causal=causal, interpret=interpret, return_residuals=True,
        block_sizes=gpu_attention.BlockSizes(block_q=tile, block_k=tile),
    )  # fmt: skip
    out, lse = out_BTNH.transpose(0, 2, 1, 3)[:, :, :T], lse2[:, :, :T] * math.log(2)  # mha's lse is in base 2
    if segment_ids is None:
        return out, lse
    # a real id never meets a negative one; a negative query met the other padding: zero it as ours does
    empty = (segment_ids < 0)[:, None, :]
    return jnp.where(empty[..., None], 0, out).astype(q.dtype), jnp.where(empty, -jnp.inf, lse)


def visible_runs(visible: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(start [B], end [B], one_run)`` of ``visible [B, S]``: each row's first and one-past-last visible slot,
    and whether every row's visible slots are exactly ``[start, end)`` (an empty row counts, as ``[0, 0)``)."""
    S = visible.shape[1]
    any_visible = visible.any(axis=1)
    start = jnp.where(any_visible, jnp.argmax(visible, axis=1), 0).astype(jnp.int32)
    end = jnp.where(any_visible, S - jnp.argmax(visible[:, ::-1], axis=1), 0).astype(jnp.int32)
    one_run = jnp.all(visible.sum(axis=1, dtype=jnp.int32) == end - start)
    return start, end, one_run


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    visible: jax.Array,
    *,
    scale: float,
    fallback: Callable[[], tuple[jax.Array, jax.Array]],
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``(out [B, K, G, H], lse [B, K, G] float32)`` of one token per row over ``k`` / ``v [B, K, S, H]``
    (``S`` a multiple of 128); ``fallback()`` computes the same where a row's visible slots are not one run."""
    _check()
    B, K, G, H = q.shape
    S = k.shape[2]
    if S % TILE:
        raise ConfigError(f"jax's decode kernel reads whole {TILE}-slot tiles: the cache has {S} slots")
    splits = math.gcd(S // TILE, MAX_SPLITS)  # each split whole tiles
    start, end, one_run = visible_runs(visible)

    def shipped():
        out, (denominator, row_max) = gpu_decode.gqa(
            q.reshape(B, K * G, H), k.swapaxes(1, 2), v.swapaxes(1, 2), start, end, sm_scale=scale, block_k=TILE,
            k_splits=splits, interpret=interpret, return_residuals=True,
        )  # fmt: skip
        return out.reshape(B, K, G, H).astype(q.dtype), (row_max + jnp.log(denominator)).reshape(B, K, G)

    return jax.lax.cond(one_run, shipped, fallback)
