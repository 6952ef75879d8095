"""Sparse prefill and decode over a :class:`~qv_jax.cache.sparse.SparseKVCache` (DuoAttention + LServe).

The model's heads are in retrieval-first order (:func:`~qv_jax.attention.sparsity.reorder_heads`), so in layer
``l`` the first ``R_l * G`` query heads belong to retrieval heads and the rest to streaming heads.

**Prefill** (:class:`SparsePrefillAttention`, any chunk length): retrieval heads attend densely over every visible
slot (as :class:`~qv_jax.cache.dense.DenseCacheAttention` does) and fill the paged pool and its key min / max.
Streaming heads never read the full context: a chunk's queries attend to (a) the sink tokens (the row's first
``sink`` visible tokens, causally) and (b) a window made of the ring's last ``local - 1`` tokens before the chunk
followed by the chunk itself, under ``HeadPattern.streaming(0, local)`` through ``sparse_attention`` (the block-sparse
kernel on TPU / GPU); the two parts are merged by their log-sum-exp. Sink tokens are seen only through (a), so the
result is exactly attention restricted to sink + the ``local`` most recent tokens.

**Decode** (:class:`SparseDecodeAttention`, one token per row): retrieval heads score pages and select the ones to
read (``qv_jax.attention.page_selection``) and attend over them with the paged decode kernel; streaming heads
attend over their sink + ring buffer with the same kernel.

Jitted entry points mirror ``qv_jax.runtime.steps`` (same arguments, a sparse cache instead of a dense one):
:func:`prefill`, :func:`decode_step`, :func:`decode_loop`. The prefill's window part assumes that within a chunk
the visible tokens of a row are contiguous (left / right padding only), which ``generate`` guarantees.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qv_jax.attention import HeadPattern, dot_product_attention, sparse_attention
from qv_jax.attention.decode import merge_attention, paged_decode_attention
from qv_jax.attention.page_selection import needs_selection, page_scores, top_pages, visit_list
from qv_jax.cache.sparse import SparseKVCache
from qv_jax.runtime import steps

Array = jax.Array


def _split_heads(x_BNTH: Array, num_retrieval_q: int) -> tuple[Array, Array]:
    return x_BNTH[:, :num_retrieval_q], x_BNTH[:, num_retrieval_q:]


class SparsePrefillAttention:
    """KV handler for a chunk of ``T`` tokens written at the cache's ``length`` (see module doc)."""

    def __init__(self, cache: SparseKVCache, segment_ids_BT: Array):
        self.start = cache.length
        self.num_tokens = segment_ids_BT.shape[1]
        self.q_segment_ids = segment_ids_BT
        self._prior_valid = cache.num_valid
        self._cache, self._target, self._rank = cache.with_chunk(self.start, segment_ids_BT)
        # new tokens make the last page selection stale: the next decode step selects afresh
        self._cache = dataclasses.replace(self._cache, selected_at=jnp.full((), -1, jnp.int32))

    @property
    def cache(self) -> SparseKVCache:
        return self._cache

    def __call__(self, layer: int, q_BNTH: Array, k_BKTH: Array, v_BKTH: Array) -> Array:
        cache = self._cache
        R = cache.retrieval_heads(layer)
        G = q_BNTH.shape[1] // k_BKTH.shape[1]
        q_ret, q_str = _split_heads(q_BNTH, R * G)
        outs = []
        if R:
            cache = cache.write_retrieval(layer, self.start, k_BKTH[:, :R], v_BKTH[:, :R])
            outs.append(
                dot_product_attention(
                    q_ret,
                    cache.k[layer],
                    cache.v[layer],
                    causal=True,
                    q_positions=self.start + jnp.arange(self.num_tokens),
                    kv_positions=jnp.arange(cache.capacity),
                    q_segment_ids=self.q_segment_ids,
                    kv_segment_ids=cache.segment_ids,
                )
            )
        if cache.streaming_heads(layer):
            window = self._window(cache, layer, k_BKTH[:, R:], v_BKTH[:, R:])
            cache = cache.write_streaming(layer, self._target, k_BKTH[:, R:], v_BKTH[:, R:])
            outs.append(self._streaming(cache, layer, q_str, window))
        self._cache = cache
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)

    def _window(self, cache: SparseKVCache, layer: int, k_BSTH: Array, v_BSTH: Array):
        """Keys / values / segment ids of the recent window: the ring's last ``local - 1`` tokens, then the chunk."""
        lay = cache.layout
        ring = lay.local - 1
        rank_BJ = self._prior_valid[:, None] - ring + jnp.arange(ring)
        slot_BJ = lay.sink + jnp.mod(rank_BJ, lay.local)
        take = slot_BJ[:, None, :, None]
        ring_k = jnp.take_along_axis(cache.stream_k[layer], take, axis=2)
        ring_v = jnp.take_along_axis(cache.stream_v[layer], take, axis=2)
        ring_seg = jnp.where(rank_BJ >= lay.sink, 0, -1)
        # sink tokens are attended through the sink part only
        chunk_seg = jnp.where(self._rank >= lay.sink, 0, -1)
        k = jnp.concatenate([ring_k, k_BSTH.astype(ring_k.dtype)], axis=2)
        v = jnp.concatenate([ring_v, v_BSTH.astype(ring_v.dtype)], axis=2)
        return k, v, jnp.concatenate([ring_seg, chunk_seg], axis=1).astype(jnp.int32)

    def _streaming(self, cache: SparseKVCache, layer: int, q_BNTH: Array, window) -> Array:
        lay = cache.layout
        B, _, T, _ = q_BNTH.shape
        k_win, v_win, seg_win = window
        parts = [
            sparse_attention(
                q_BNTH,
                k_win,
                v_win,
                HeadPattern.streaming(0, lay.local),
                segment_ids=(jnp.zeros((B, T), jnp.int32), seg_win),
                backend=lay.backend,
                kernel=lay.kernel,
                return_lse=True,
            )
        ]
        if lay.sink:
            sink_slot = cache.stream_slot[:, : lay.sink]
            parts.append(
                dot_product_attention(
                    q_BNTH,
                    cache.stream_k[layer][:, :, : lay.sink],
                    cache.stream_v[layer][:, :, : lay.sink],
                    causal=True,
                    q_positions=self.start + jnp.arange(T),
                    kv_positions=sink_slot,
                    kv_segment_ids=jnp.where(sink_slot >= 0, 0, -1),
                    return_lse=True,
                )
            )
        return merge_attention(*parts)[0]


class SparseDecodeAttention:
    """KV handler for one token per row: page selection + paged decode kernels (see module doc)."""

    def __init__(self, cache: SparseKVCache, segment_ids_B1: Array):
        self.start = cache.length
        self._cache, self._target, _ = cache.with_chunk(self.start, segment_ids_B1)
        lay = cache.layout
        self._length = self.start + 1
        B, C = self._cache.segment_ids.shape
        visible_BC = self._cache.segment_ids >= 0
        self._token_valid = visible_BC.reshape(B, C // lay.page_size, lay.page_size)
        self._page_valid = jnp.any(visible_BC.reshape(B, -1, lay.logical_page_size), axis=-1)
        W = lay.stream_slots
        self._stream_valid = (self._cache.stream_slot >= 0).reshape(B, W // lay.page_size, lay.page_size)
        if lay.token_budget is not None:
            self._select = needs_selection(
                self._length,
                cache.selected_at,
                token_budget=lay.token_budget,
                page_size=lay.page_size,
                reselect_every=lay.reselect_every,
            )

    @property
    def cache(self) -> SparseKVCache:
        lay = self._cache.layout
        if lay.token_budget is None:
            return self._cache
        selected_at = jnp.where(self._select, self._length, self._cache.selected_at)
        return dataclasses.replace(self._cache, selected_at=selected_at.astype(jnp.int32))

    def __call__(self, layer: int, q_BNTH: Array, k_BKTH: Array, v_BKTH: Array) -> Array:
        cache = self._cache
        lay = cache.layout
        B, N, _, H = q_BNTH.shape
        R = cache.retrieval_heads(layer)
        S = cache.streaming_heads(layer)
        G = N // (R + S)
        q_BKGH = q_BNTH[:, :, 0].reshape(B, R + S, G, H)
        outs = []
        if R:
            cache = cache.write_retrieval(layer, self.start, k_BKTH[:, :R], v_BKTH[:, :R])
            indices, counts = self._pages(cache, layer, q_BKGH[:, :R])
            cache = self._cache_with_selection(cache, layer, indices)
            C = cache.capacity
            out, _ = paged_decode_attention(
                q_BKGH[:, :R],
                cache.k[layer].reshape(B, R, C // lay.page_size, lay.page_size, H),
                cache.v[layer].reshape(B, R, C // lay.page_size, lay.page_size, H),
                self._token_valid,
                indices,
                counts,
                backend=lay.backend,
                kernel=lay.kernel,
            )
            outs.append(out)
        if S:
            cache = cache.write_streaming(layer, self._target, k_BKTH[:, R:], v_BKTH[:, R:])
            num_pages = lay.stream_slots // lay.page_size
            out, _ = paged_decode_attention(
                q_BKGH[:, R:],
                cache.stream_k[layer].reshape(B, S, num_pages, lay.page_size, H),
                cache.stream_v[layer].reshape(B, S, num_pages, lay.page_size, H),
                self._stream_valid,
                jnp.broadcast_to(jnp.arange(num_pages, dtype=jnp.int32), (B, S, num_pages)),
                jnp.full((B, S), num_pages, jnp.int32),
                backend=lay.backend,
                kernel=lay.kernel,
            )
            outs.append(out)
        self._cache = cache
        out_BKGH = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
        return out_BKGH.reshape(B, N, 1, H)

    def _pages(self, cache: SparseKVCache, layer: int, q_BRGH: Array) -> tuple[Array, Array]:
        """The page list ``(indices [B, R, n], counts [B, R])`` of this layer's retrieval heads at this step."""
        lay = cache.layout
        B, R = q_BRGH.shape[:2]
        num_pages = cache.capacity // lay.page_size
        if lay.token_budget is None:
            newest = (self._length - 1) // lay.page_size
            indices = jnp.broadcast_to(jnp.arange(num_pages, dtype=jnp.int32), (B, R, num_pages))
            return indices, jnp.full((B, R), newest + 1, jnp.int32)

        def select():
            scores = page_scores(
                q_BRGH,
                cache.k_min[layer],
                cache.k_max[layer],
                self._page_valid,
                logical_pages_per_page=lay.page_size // lay.logical_page_size,
                backend=lay.backend,
                kernel=lay.kernel,
            )
            if lay.kv_repeat > 1:  # replicas of a KV head (a mesh layout) take the best score of their group
                _, _, NP = scores.shape
                grouped = scores.reshape(B, R // lay.kv_repeat, lay.kv_repeat, NP).max(axis=2, keepdims=True)
                scores = jnp.broadcast_to(grouped, (B, R // lay.kv_repeat, lay.kv_repeat, NP)).reshape(B, R, NP)
            return top_pages(scores, (self._length - 1) // lay.page_size, cache.selected[layer].shape[2])

        top = jax.lax.cond(self._select, select, lambda: cache.selected[layer])
        return visit_list(top, self._length, token_budget=lay.token_budget, page_size=lay.page_size)

    def _cache_with_selection(self, cache: SparseKVCache, layer: int, indices: Array) -> SparseKVCache:
        if cache.layout.token_budget is None:
            return cache
        return cache.with_selection(layer, indices[..., :-1])


# ---------------------------------------------------------------------------------------------------------------
# jitted steps (the functions of qv_jax.runtime.steps, over a SparseKVCache)

prefill, decode_step, decode_loop = steps.jitted_steps(SparsePrefillAttention, SparseDecodeAttention)
