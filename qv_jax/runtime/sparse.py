"""Sparse prefill and decode over a :class:`~qv_jax.cache.sparse.SparseKVCache` (DuoAttention + LServe).

The model's heads are in retrieval-first order, so in each layer the first ``G`` query heads of every retrieval
KV head come first. Prefill: retrieval heads attend densely and fill the pages; streaming heads attend to their
sink and a window of the latest tokens only; a LongGen strided layer's heads fill pages and attend under their
strided pattern. Decode: retrieval heads select pages and attend over them, streaming heads over their sink + ring
buffer, strided heads over the pages their pattern reaches, all with the paged decode kernel. Details:
docs/attention.md, "Sparse decoding" and "LongGen hybrid models". The jitted steps mirror
``qv_jax.runtime.dense``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qv_jax.attention import calls
from qv_jax.attention.backends import AttentionConfig
from qv_jax.attention.page_selection import needs_selection, page_scores, top_pages, visit_list
from qv_jax.attention.patterns import HeadPattern
from qv_jax.attention.reference import dot_product_attention, merge_attention
from qv_jax.attention.sharded import paged_decode_attention, sparse_attention
from qv_jax.cache.sparse import SparseKVCache
from qv_jax.runtime.steps import jitted_steps

Array = jax.Array


class SparsePrefillAttention:
    """KV handler for a chunk of ``T`` tokens written at the cache's ``length``.

    Streaming heads see (a) the sink tokens, causally, and (b) a window of the ring's last ``local - 1`` tokens
    followed by the chunk under ``HeadPattern.streaming(0, local)`` (the block-sparse kernel on TPU / GPU); the
    parts merge by their log-sum-exp, which is exactly attention restricted to sink + the ``local`` latest tokens.
    The window assumes a row's visible tokens are contiguous within a chunk (left / right padding only).
    """

    def __init__(self, cache: SparseKVCache, segment_ids_BT: Array, attention: AttentionConfig):
        self.start = cache.length
        self.num_tokens = segment_ids_BT.shape[1]
        self.q_segment_ids = segment_ids_BT
        self.attention = attention
        self.earlier = jnp.where(jnp.arange(cache.capacity) < self.start, cache.segment_ids, -1)
        self._prior_valid = cache.num_valid
        self._cache, self._target, self._rank = cache.with_chunk(self.start, segment_ids_BT)
        # new tokens make the last page selection stale: the next decode step selects afresh
        self._cache = dataclasses.replace(self._cache, selected_at=jnp.full((), -1, jnp.int32))

    @property
    def cache(self) -> SparseKVCache:
        return self._cache

    def __call__(self, layer: int, q_BNTH: Array, k_BKTH: Array, v_BKTH: Array) -> Array:
        cache = self._cache
        retrieval = cache.retrieval_heads(layer)
        G = q_BNTH.shape[1] // k_BKTH.shape[1]
        split = retrieval * G  # query heads of the retrieval KV heads come first
        outs = []
        if retrieval and cache.geometry.is_strided(layer):
            cache = cache.write_strided(layer, self._rank, k_BKTH, v_BKTH)
            outs.append(self._strided(cache, layer, q_BNTH, k_BKTH, v_BKTH))
        elif retrieval:
            k_new, v_new = k_BKTH[:, :retrieval], v_BKTH[:, :retrieval]
            cache = cache.write_retrieval(layer, self.start, k_new, v_new)
            out, _ = calls.append_attention(
                self.attention,
                q_BNTH[:, :split],
                k_new,
                v_new,
                self.q_segment_ids,
                k_memory=cache.k[layer],
                v_memory=cache.v[layer],
                memory_segment_ids=self.earlier,
            )
            outs.append(out)
        if cache.streaming_heads(layer):
            k_BKTH, v_BKTH = k_BKTH[:, retrieval:], v_BKTH[:, retrieval:]
            window = self._window(cache, layer, k_BKTH, v_BKTH)
            cache = cache.write_streaming(layer, self._target, k_BKTH, v_BKTH)
            outs.append(self._streaming(cache, layer, q_BNTH[:, split:], window))
        self._cache = cache
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)

    def _strided(self, cache: SparseKVCache, layer: int, q_BNTH: Array, k_BKTH: Array, v_BKTH: Array) -> Array:
        """A strided layer's chunk over every earlier token and itself under its pattern, whose positions are the
        tokens' ranks (the slots of its compacted pool). When the chunk's ranks are its own positions (the first
        chunk, padded at its end only): the block-sparse kernel over the chunk alone. Otherwise the chunk's ranks
        are traced and the kernels' block tables static: the masked reference over the pool."""
        geometry = cache.geometry
        patterns = geometry.strided_patterns(k_BKTH.shape[1])
        T = q_BNTH.shape[2]
        rank_BT = self._rank
        first = jnp.all((self._prior_valid == 0)[:, None] & ((rank_BT < 0) | (rank_BT == jnp.arange(T))))

        def alone():
            return sparse_attention(
                q_BNTH,
                k_BKTH,
                v_BKTH,
                patterns,
                segment_ids=self.q_segment_ids,
                backend=geometry.backend,
                kernel=geometry.kernel,
            )

        def behind():
            k_pos_S = jnp.arange(cache.capacity)
            q_pos_BT1 = jnp.maximum(rank_BT, 0)[:, :, None]
            reach_BTKS = jnp.stack([p.allows(q_pos_BT1, k_pos_S, causal=True, xp=jnp) for p in patterns], 2)
            return dot_product_attention(
                q_BNTH,
                cache.k[layer],
                cache.v[layer],
                causal=False,
                kv_segment_ids=jnp.where(k_pos_S < cache.num_valid[:, None], 0, -1),
                mask=reach_BTKS.transpose(0, 2, 1, 3),
            )

        return jax.lax.cond(first, alone, behind)

    def _window(self, cache: SparseKVCache, layer: int, k_BKTH: Array, v_BKTH: Array):
        """Keys / values / segment ids of the recent window: the ring's last ``local - 1`` tokens, then the chunk."""
        geometry = cache.geometry
        ring = geometry.local - 1
        rank = self._prior_valid[:, None] - ring + jnp.arange(ring)  # [B, ring]
        slot = geometry.sink + jnp.mod(rank, geometry.local)
        take = slot[:, None, :, None]
        ring_k = jnp.take_along_axis(cache.stream_k[layer], take, axis=2)
        ring_v = jnp.take_along_axis(cache.stream_v[layer], take, axis=2)
        ring_seg = jnp.where(rank >= geometry.sink, 0, -1)
        # sink tokens are attended through the sink part only
        chunk_seg = jnp.where(self._rank >= geometry.sink, 0, -1)
        k = jnp.concatenate([ring_k, k_BKTH.astype(ring_k.dtype)], axis=2)
        v = jnp.concatenate([ring_v, v_BKTH.astype(ring_v.dtype)], axis=2)
        return k, v, jnp.concatenate([ring_seg, chunk_seg], axis=1).astype(jnp.int32)

    def _streaming(self, cache: SparseKVCache, layer: int, q_BNTH: Array, window) -> Array:
        geometry = cache.geometry
        B, _, T, _ = q_BNTH.shape
        k_window, v_window, seg_window = window
        parts = [
            sparse_attention(
                q_BNTH,
                k_window,
                v_window,
                HeadPattern.streaming(0, geometry.local),
                segment_ids=(jnp.zeros((B, T), jnp.int32), seg_window),
                backend=geometry.backend,
                kernel=geometry.kernel,
                return_lse=True,
            )
        ]
        if geometry.sink:
            sink_slot = cache.stream_slot[:, : geometry.sink]
            parts.append(
                dot_product_attention(
                    q_BNTH,
                    cache.stream_k[layer][:, :, : geometry.sink],
                    cache.stream_v[layer][:, :, : geometry.sink],
                    causal=True,
                    q_positions=self.start + jnp.arange(T),
                    kv_positions=sink_slot,
                    kv_segment_ids=jnp.where(sink_slot >= 0, 0, -1),
                    return_lse=True,
                )
            )
        return merge_attention(*parts)[0]


class SparseDecodeAttention:
    """KV handler for one token per row: page selection + the paged decode kernel (see module doc)."""

    def __init__(self, cache: SparseKVCache, segment_ids_B1: Array, attention: AttentionConfig):
        del attention  # the pools' paged kernels are the sparse geometry's choice
        self.start = cache.length
        self._cache, self._target, self._rank = cache.with_chunk(self.start, segment_ids_B1)
        geometry = cache.geometry
        self._length = self.start + 1
        B, S = self._cache.segment_ids.shape
        visible_BS = self._cache.segment_ids >= 0
        self._token_valid = visible_BS.reshape(B, S // geometry.page_size, geometry.page_size)
        self._page_valid = jnp.any(visible_BS.reshape(B, -1, geometry.logical_page_size), axis=-1)
        stream_valid = self._cache.stream_slot >= 0
        self._stream_valid = stream_valid.reshape(B, geometry.stream_slots // geometry.page_size, geometry.page_size)
        if geometry.token_budget is not None:
            self._select = needs_selection(
                self._length,
                cache.selected_at,
                token_budget=geometry.token_budget,
                page_size=geometry.page_size,
                reselect_every=geometry.reselect_every,
            )

    @property
    def cache(self) -> SparseKVCache:
        if self._cache.geometry.token_budget is None:
            return self._cache
        selected_at = jnp.where(self._select, self._length, self._cache.selected_at)
        return dataclasses.replace(self._cache, selected_at=selected_at.astype(jnp.int32))

    def __call__(self, layer: int, q_BNTH: Array, k_BKTH: Array, v_BKTH: Array) -> Array:
        cache = self._cache
        geometry = cache.geometry
        B, N, _, H = q_BNTH.shape
        retrieval, streaming = cache.retrieval_heads(layer), cache.streaming_heads(layer)
        K = retrieval + streaming
        q_BKGH = q_BNTH[:, :, 0].reshape(B, K, N // K, H)
        page_size = geometry.page_size
        outs = []
        if retrieval:
            if geometry.is_strided(layer):
                cache = cache.write_strided(layer, self._rank, k_BKTH, v_BKTH)
            else:
                cache = cache.write_retrieval(layer, self.start, k_BKTH[:, :retrieval], v_BKTH[:, :retrieval])
            pages = cache.capacity // page_size
            token_valid = self._token_valid
            if geometry.is_strided(layer):
                indices, counts, token_valid = self._strided_pages(cache, retrieval)
            else:
                indices, counts = self._pages(cache, layer, q_BKGH[:, :retrieval])
            if geometry.token_budget is not None and not geometry.is_strided(layer):
                cache = cache.with_selection(layer, indices[..., :-1])
            out, _ = paged_decode_attention(
                q_BKGH[:, :retrieval],
                cache.k[layer].reshape(B, retrieval, pages, page_size, H),
                cache.v[layer].reshape(B, retrieval, pages, page_size, H),
                token_valid,
                indices,
                counts,
                backend=geometry.backend,
                kernel=geometry.kernel,
            )
            outs.append(out)
        if streaming:
            cache = cache.write_streaming(layer, self._target, k_BKTH[:, retrieval:], v_BKTH[:, retrieval:])
            pages = geometry.stream_slots // page_size
            out, _ = paged_decode_attention(
                q_BKGH[:, retrieval:],
                cache.stream_k[layer].reshape(B, streaming, pages, page_size, H),
                cache.stream_v[layer].reshape(B, streaming, pages, page_size, H),
                self._stream_valid,
                jnp.broadcast_to(jnp.arange(pages, dtype=jnp.int32), (B, streaming, pages)),
                jnp.full((B, streaming), pages, jnp.int32),
                backend=geometry.backend,
                kernel=geometry.kernel,
            )
            outs.append(out)
        self._cache = cache
        out_BKGH = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
        return out_BKGH.reshape(B, N, 1, H)

    def _strided_pages(self, cache: SparseKVCache, K: int) -> tuple[Array, Array, Array]:
        """A strided layer's pages at this step, those its heads reach listed first: ``(indices [B, K, pages], counts
        [B, K], token_valid [B, pages, page_size])`` of its compacted pool (a page lies in one block: ``block`` is a
        multiple of ``page_size``)."""
        geometry = cache.geometry
        B, S = cache.segment_ids.shape
        pages = S // geometry.page_size
        first_slot_11P = (jnp.arange(pages) * geometry.page_size)[None, None, :]
        q_pos_B11 = (cache.num_valid - 1)[:, None, None]
        patterns = geometry.strided_patterns(K)
        reach_BKP = jnp.concatenate([p.allows(q_pos_B11, first_slot_11P, causal=True, xp=jnp) for p in patterns], 1)
        order_BKP = jnp.argsort(~reach_BKP, axis=-1, stable=True).astype(jnp.int32)
        valid_BS = jnp.arange(S) < cache.num_valid[:, None]
        token_valid = valid_BS.reshape(B, pages, geometry.page_size)
        return order_BKP, jnp.sum(reach_BKP, axis=-1).astype(jnp.int32), token_valid

    def _pages(self, cache: SparseKVCache, layer: int, q_BKGH: Array) -> tuple[Array, Array]:
        """The page list ``(indices [B, K, listed], counts [B, K])`` of this layer's retrieval heads at this step."""
        geometry = cache.geometry
        B, K = q_BKGH.shape[:2]
        pages = cache.capacity // geometry.page_size
        if geometry.token_budget is None:
            newest = (self._length - 1) // geometry.page_size
            indices = jnp.broadcast_to(jnp.arange(pages, dtype=jnp.int32), (B, K, pages))
            return indices, jnp.full((B, K), newest + 1, jnp.int32)

        def select():
            scores = page_scores(
                q_BKGH,
                cache.k_min[layer],
                cache.k_max[layer],
                self._page_valid,
                logical_pages_per_page=geometry.page_size // geometry.logical_page_size,
                backend=geometry.backend,
                kernel=geometry.kernel,
            )
            repeat = geometry.kv_repeat
            if repeat > 1:  # replicas of a KV head (a mesh layout) take the best score of their group
                grouped = scores.reshape(B, K // repeat, repeat, pages).max(axis=2, keepdims=True)
                scores = jnp.broadcast_to(grouped, (B, K // repeat, repeat, pages)).reshape(B, K, pages)
            return top_pages(scores, (self._length - 1) // geometry.page_size, cache.selected[layer].shape[2])

        top = jax.lax.cond(self._select, select, lambda: cache.selected[layer])
        return visit_list(top, self._length, token_budget=geometry.token_budget, page_size=geometry.page_size)


prefill, decode_step, decode_loop = jitted_steps(SparsePrefillAttention, SparseDecodeAttention)
