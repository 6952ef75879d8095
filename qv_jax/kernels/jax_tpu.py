"""jax's shipped TPU kernel, splash attention, in our layout: dense and sink + local heads, segment ids, GQA, T <= S.

``splash_attention`` takes ``q [B, N, T, H]`` and ``k`` / ``v [B, K, S, H]`` (queries are the last ``T`` of the
``S`` positions) and one window per KV head (``None``: dense; ``(sink, local)``: a streaming head), builds one
splash mask per query head (``CausalMask`` / ``FullMask``; a streaming head is a ``LocalMask`` or'ed with its sink
columns), and runs ``make_splash_mha`` on each row (splash is unbatched; it reads a GQA group's KV head itself, so
nothing is repeated). Splash returns the log-sum-exp (``save_residuals``), which the merges of a chunk behind a
memory need. Forward only: no backward tiles are given. See docs/attention.md, "jax's kernels".
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qv_jax.errors import ConfigError
from qv_jax.kernels.padding import pad_axis

try:  # moved in and out of jax.experimental across releases: a clear error instead of an ImportError at import
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
except ImportError:  # pragma: no cover - only on jax releases without it
    splash = None

LANES = 128  # splash's tiles are whole 128-lane vregs, both ways, once segment ids are given
TILES = (512, 256, 128)  # the largest that divides the padded length (splash's own default is 128 x 128)

Window = tuple[int, int] | None  # per KV head: None for dense, (sink, local) for a streaming head


def _module():
    if splash is None:  # pragma: no cover - only on jax releases without it
        raise ConfigError(
            f"attention='jax' on TPU needs jax.experimental.pallas.ops.tpu.splash_attention, which jax "
            f"{jax.__version__} does not ship; use attention='pallas'"
        )
    return splash


if splash is not None:

    @dataclasses.dataclass(frozen=True, eq=True)
    class SinkColumns(splash.Mask):
        """The first ``sink`` keys, causally when ``causal`` (query ``i`` at position ``i + offset``): the part of a
        streaming head splash has no mask for; or'ed with a ``LocalMask``."""

        q_len: int
        kv_len: int
        sink: int
        offset: int
        causal: bool

        @property
        def shape(self) -> tuple[int, int]:
            return (self.q_len, self.kv_len)

        def __getitem__(self, idx) -> np.ndarray:
            rows, cols = (np.arange(self.shape[d])[s] for d, s in enumerate(idx))
            allowed = np.broadcast_to(cols[None, :] < self.sink, (rows.size, cols.size))
            return allowed & (cols[None, :] <= rows[:, None] + self.offset) if self.causal else allowed


def _head_mask(window: Window, shape: tuple[int, int], offset: int, causal: bool):
    sa = _module()
    if window is None:
        return sa.CausalMask(shape, offset=offset) if causal else sa.FullMask(shape)
    sink, local = window
    local_mask = sa.LocalMask(shape, window_size=(local - 1, 0 if causal else local - 1), offset=offset)
    if sink == 0:
        return local_mask
    return local_mask | SinkColumns(*shape, sink, offset, causal)


@functools.lru_cache(maxsize=32)
def _mask(windows: tuple[Window, ...], group: int, shape: tuple[int, int], offset: int, causal: bool):
    """One splash mask per query head, the same object for the same arguments: splash caches the walk over every
    tile that turns a mask into its block tables by the mask (its ``LogicalOr`` compares by identity)."""
    sa = _module()
    return sa.MultiHeadMask([_head_mask(w, shape, offset, causal) for w in windows for _ in range(group)])


def _kernel(mask, blocks: tuple[int, int], interpret: bool):
    # built per call, not cached: it holds its block tables as arrays, which must belong to the current trace
    sa = _module()
    block_q, block_kv = blocks
    return sa.make_splash_mha(
        mask,
        block_sizes=sa.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv),
        head_shards=1,
        q_seq_shards=1,
        save_residuals=True,
        interpret=interpret,
    )


def _tile(length: int) -> tuple[int, int]:
    """``(padded length, tile)``: whole 128-lane tiles, the tile the largest of :data:`TILES` that divides."""
    padded = -(-length // LANES) * LANES
    return padded, next(t for t in TILES if padded % t == 0)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    windows: tuple[Window, ...],
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    *,
    causal: bool,
    scale: float,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``(out [B, N, T, H], lse [B, N, T] float32)``; a query that sees no key (negative id, or none of its
    segment) gets zeros and ``lse = -inf``, as ours. Splash picks its own tiles (``AttentionConfig``'s are ours)."""
    B, N, T, _ = q.shape
    K, S = k.shape[1], k.shape[2]
    sa = _module()
    Tp, bq = _tile(T)
    Sp, bkv = _tile(S)
    if q_segment_ids is None and (causal is False and Sp != S):
        # padded keys are later than every query when causal; otherwise ids keep them out
        q_segment_ids, kv_segment_ids = jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32)
    kernel = _kernel(_mask(tuple(windows), N // K, (Tp, Sp), S - T, causal), (bq, bkv), interpret)
    # splash does not scale the logits: scale the queries once, in their dtype
    q_p = pad_axis((q * jnp.asarray(scale, q.dtype)).astype(q.dtype), 2, Tp)
    k_p, v_p = pad_axis(k, 2, Sp), pad_axis(v, 2, Sp)
    if q_segment_ids is None:
        out, (lse,) = jax.vmap(kernel)(q_p, k_p, v_p)
        visible = jnp.ones((B, Tp), bool)
    else:
        # padding on both sides gets -1: a real (non-negative) id never meets it; negative queries are zeroed below
        q_ids = pad_axis(q_segment_ids.astype(jnp.int32), 1, Tp, value=-1)
        kv_ids = pad_axis(kv_segment_ids.astype(jnp.int32), 1, Sp, value=-1)
        out, (lse,) = jax.vmap(lambda q, k, v, qi, ki: kernel(q, k, v, segment_ids=sa.SegmentIds(qi, ki)))(
            q_p, k_p, v_p, q_ids, kv_ids
        )
        visible = q_ids >= 0
    # a row splash found nothing for holds its mask value (finite, about -2e38) in the log-sum-exp, or log(0)
    empty = ~visible[:, None, :] | (lse < 0.5 * float(np.finfo(np.float32).min))
    out = jnp.where(empty[..., None], 0, out).astype(q.dtype)
    lse = jnp.where(empty, -jnp.inf, lse)
    return out[:, :, :T], lse[:, :, :T]
