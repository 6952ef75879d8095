"""The KV memory of sparse decoding: a paged pool for retrieval heads and a sink + ring pool for streaming heads.

With the model's heads in retrieval-first order (``qv_jax.attention.heads.reorder_heads``) each layer keeps its
retrieval heads' every slot, read as pages with per-logical-page key min / max, and its streaming heads' first
``sink`` and latest ``local`` tokens. Pools, bookkeeping and byte counts: docs/attention.md, "Sparse decoding".
A pytree (the static :class:`SparseGeometry` rides along) that jitted steps donate and update in place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qv_jax.attention.patterns import HeadPattern
from qv_jax.attention.sparsity import SparsityConfig
from qv_jax.cache.dense import CacheShape, KVCache, replace_layer
from qv_jax.errors import InputError
from qv_jax.sharding.layout import layout_field

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SparseGeometry:
    """The static part of a sparse cache: pool geometry, selection rule and the backend that runs it."""

    sink: int
    local: int
    stream_slots: int
    page_size: int
    logical_page_size: int
    token_budget: int | None
    reselect_every: int
    backend: str
    kernel: str | None
    # consecutive KV heads that are replicas of one stored head (set on a mesh by qv_jax.sharding): they score pages
    # with their whole query group together, so they select what the unreplicated head would
    kv_repeat: int = 1
    # LongGen's strided layers (every head keeps every token and reads the pages its strided pattern reaches)
    strided_layers: tuple[bool, ...] = ()
    strided: HeadPattern | None = None

    @classmethod
    def from_config(cls, sparsity: SparsityConfig, kv_repeat: int = 1) -> SparseGeometry:
        backend, kernel = sparsity.resolve_backend()
        strided = () if sparsity.layers is None else sparsity.strided_layers(len(sparsity.layers))
        return cls(
            strided_layers=strided,
            strided=sparsity.strided_pattern(0) if any(strided) else None,
            sink=sparsity.sink,
            local=sparsity.local,
            stream_slots=sparsity.stream_slots,
            page_size=sparsity.page_size,
            logical_page_size=sparsity.logical_page_size,
            token_budget=sparsity.token_budget,
            reselect_every=sparsity.reselect_every,
            backend=backend,
            kernel=kernel,
            kv_repeat=kv_repeat,
        )

    def is_strided(self, layer: int) -> bool:
        return bool(self.strided_layers) and self.strided_layers[layer]

    def strided_patterns(self, num_kv_heads: int) -> tuple[HeadPattern, ...]:
        """A strided layer's pattern per running KV head: a stored head's offset, shared by its replicas."""
        p = self.strided
        return tuple(
            HeadPattern.strided(p.local_blocks, p.vert_stride, (h // self.kv_repeat) % p.vert_stride, p.block)
            for h in range(num_kv_heads)
        )


def sparse_kv_bytes(
    sparsity: SparsityConfig,
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    batch: int,
    capacity: int,
    dtype,
) -> int:
    """Bytes a :class:`SparseKVCache` of this shape allocates (capacity rounded like :meth:`SparseKVCache.create`).

    Per layer with ``r`` retrieval and ``k - r`` streaming heads, in the cache dtype: keys and values of every slot
    for the retrieval heads, their key min / max per logical page (none in a LongGen strided layer, which selects
    no pages), and the sink + ring slots of the streaming heads; plus int32 bookkeeping shared by the layers
    (docs/attention.md gives the formula).
    """
    item = jnp.dtype(dtype).itemsize
    S = sparsity.padded_capacity(capacity)
    stream_slots = sparsity.stream_slots
    logical_pages = S // sparsity.logical_page_size
    stored = sparsity.stored_selection(S)
    total = 0
    retrieval_heads = sparsity.retrieval_heads(num_layers, num_kv_heads)
    for retrieval, strided in zip(retrieval_heads, sparsity.strided_layers(num_layers), strict=True):
        streaming = num_kv_heads - retrieval
        selecting = 0 if strided else retrieval  # heads with key bounds and a page selection
        per_token = 2 * retrieval * S + 2 * selecting * logical_pages + 2 * streaming * stream_slots
        total += batch * head_dim * item * per_token + 4 * batch * selecting * stored
    return total + 4 * (batch * S + batch * stream_slots + batch + 2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseKVCache(CacheShape):
    """Retrieval pages with key min / max, streaming sink + ring buffers, and page-selection state (see module).

    Per layer: ``k`` / ``v [B, retrieval heads, S, H]``, ``k_min`` / ``k_max [B, retrieval heads, logical pages,
    H]``, ``stream_k`` / ``stream_v [B, streaming heads, stream_slots, H]``, ``selected [B, retrieval heads,
    stored pages]``. Shared: ``segment_ids [B, S]``, ``stream_slot [B, stream_slots]`` (the cache slot each
    streaming slot holds, ``-1`` if none), ``num_valid [B]``, ``length`` and ``selected_at`` (the length at the last
    page selection, ``-1`` for none).
    """

    k: tuple[Array, ...] = layout_field("BKSH")
    v: tuple[Array, ...] = layout_field("BKSH")
    k_min: tuple[Array, ...] = layout_field("BK.H")
    k_max: tuple[Array, ...] = layout_field("BK.H")
    stream_k: tuple[Array, ...] = layout_field("BK.H")
    stream_v: tuple[Array, ...] = layout_field("BK.H")
    segment_ids: Array = layout_field("BS")
    stream_slot: Array = layout_field("B.")
    num_valid: Array = layout_field("B")
    length: Array = layout_field("")
    selected: tuple[Array, ...] = layout_field("BK.")
    selected_at: Array = layout_field("")
    geometry: SparseGeometry = dataclasses.field(metadata=dict(static=True))

    # ---- construction ------------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        sparsity: SparsityConfig,
        *,
        num_kv_heads: int,
        batch: int,
        capacity: int,
        head_dim: int,
        dtype=jnp.float32,
        num_layers: int | None = None,
        kv_repeat: int = 1,
    ) -> SparseKVCache:
        """An empty cache for ``capacity`` slots (rounded up to ``sparsity.capacity_multiple``).

        ``sparsity.streaming_heads`` must be in retrieval-first order (:meth:`SparsityConfig.retrieval_first`);
        ``num_layers`` is needed only when it has no streaming heads. ``kv_repeat``: consecutive KV heads that are
        replicas of one stored head (a mesh layout, ``qv_jax.sharding``).
        """
        geometry = SparseGeometry.from_config(sparsity, kv_repeat)
        retrieval = _retrieval_counts(sparsity, num_layers, num_kv_heads)
        if min(batch, capacity, head_dim) <= 0:
            raise InputError(f"cache sizes must be positive: batch={batch} capacity={capacity} head_dim={head_dim}")
        S = sparsity.padded_capacity(capacity)
        stream_slots = geometry.stream_slots
        stored = sparsity.stored_selection(S)
        pool = [(batch, r, S, head_dim) for r in retrieval]
        # a strided layer reads the pages its pattern reaches: no key bounds, no selection
        selecting = [0 if geometry.is_strided(layer) else r for layer, r in enumerate(retrieval)]
        stats = [(batch, r, S // geometry.logical_page_size, head_dim) for r in selecting]
        stream = [(batch, num_kv_heads - r, stream_slots, head_dim) for r in retrieval]
        return cls(
            k=tuple(jnp.zeros(s, dtype) for s in pool),
            v=tuple(jnp.zeros(s, dtype) for s in pool),
            k_min=tuple(jnp.zeros(s, dtype) for s in stats),
            k_max=tuple(jnp.zeros(s, dtype) for s in stats),
            stream_k=tuple(jnp.zeros(s, dtype) for s in stream),
            stream_v=tuple(jnp.zeros(s, dtype) for s in stream),
            segment_ids=jnp.full((batch, S), -1, jnp.int32),
            stream_slot=jnp.full((batch, stream_slots), -1, jnp.int32),
            num_valid=jnp.zeros((batch,), jnp.int32),
            length=jnp.zeros((), jnp.int32),
            selected=tuple(jnp.zeros((batch, r, stored), jnp.int32) for r in selecting),
            selected_at=jnp.full((), -1, jnp.int32),
            geometry=geometry,
        )

    @classmethod
    def from_dense(
        cls, cache: KVCache, sparsity: SparsityConfig, *, capacity: int | None = None, kv_repeat: int = 1
    ) -> SparseKVCache:
        """The sparse decode state of a prefilled dense cache (e.g. QuickPrefill's pruned cache).

        The dense cache's KV heads must be in the retrieval-first order of ``sparsity.streaming_heads`` (the model
        that filled it was reordered by :func:`~qv_jax.attention.heads.reorder_heads`). Retrieval heads keep every
        slot; a streaming head keeps the first ``sink`` visible tokens of each row and the ``local`` latest; a
        strided layer keeps every visible token, compacted (slot = rank).
        ``capacity`` (slots, default the dense capacity) must leave room for the tokens still to be decoded.
        Runs eagerly or under ``jit`` (static shapes only).
        """
        B, K, dense_slots, H = cache.k[0].shape
        retrieval = _retrieval_counts(sparsity, cache.num_layers, K)
        out = cls.create(
            sparsity,
            num_kv_heads=K,
            batch=B,
            capacity=dense_slots if capacity is None else capacity,
            head_dim=H,
            dtype=cache.k[0].dtype,
            num_layers=cache.num_layers,
            kv_repeat=kv_repeat,
        )
        S = out.capacity
        if S < dense_slots:
            raise InputError(f"capacity {S} is smaller than the dense cache's {dense_slots} slots")
        geometry = out.geometry
        written = jnp.where(jnp.arange(dense_slots) < cache.length, cache.segment_ids, -1)
        seg_BS = jnp.full((B, S), -1, jnp.int32).at[:, :dense_slots].set(written)
        visible = seg_BS[:, :dense_slots] >= 0
        rank = jnp.cumsum(visible, axis=1) - 1
        num_valid = jnp.sum(visible, axis=1).astype(jnp.int32)
        target = _stream_target(rank, visible, num_valid, geometry)
        slots = jnp.broadcast_to(jnp.arange(dense_slots, dtype=jnp.int32), (B, dense_slots))
        stream_slot = _scatter_rows(out.stream_slot, target, slots)
        k, v, k_min, k_max, stream_k, stream_v = [], [], [], [], [], []
        for layer, r in enumerate(retrieval):
            dense_k, dense_v = cache.k[layer], cache.v[layer]
            if geometry.is_strided(layer):  # compacted: slot = rank
                strided = out.write_strided(layer, jnp.where(visible, rank, -1), dense_k, dense_v)
                pool_k, pool_v = strided.k[layer], strided.v[layer]
            else:
                pool_k = out.k[layer].at[:, :, :dense_slots].set(dense_k[:, :r])
                pool_v = out.v[layer].at[:, :, :dense_slots].set(dense_v[:, :r])
            k.append(pool_k)
            v.append(pool_v)
            if geometry.is_strided(layer):
                lo, hi = out.k_min[layer], out.k_max[layer]
            else:
                lo, hi = _page_min_max(pool_k, seg_BS, geometry.logical_page_size)
            k_min.append(lo)
            k_max.append(hi)
            stream_k.append(_scatter_heads(out.stream_k[layer], target, dense_k[:, r:]))
            stream_v.append(_scatter_heads(out.stream_v[layer], target, dense_v[:, r:]))
        return dataclasses.replace(
            out,
            k=tuple(k),
            v=tuple(v),
            k_min=tuple(k_min),
            k_max=tuple(k_max),
            stream_k=tuple(stream_k),
            stream_v=tuple(stream_v),
            segment_ids=seg_BS,
            stream_slot=stream_slot,
            num_valid=num_valid,
            length=jnp.asarray(cache.length, jnp.int32),
        )

    # ---- shapes ------------------------------------------------------------------------------------------------

    def retrieval_heads(self, layer: int) -> int:
        return self.k[layer].shape[1]

    def streaming_heads(self, layer: int) -> int:
        return self.stream_k[layer].shape[1]

    # ---- writes (used by the prefill / decode handlers of qv_jax.runtime.sparse) ---------------------------------

    def with_chunk(self, start: Array, segment_ids_BT: Array) -> tuple[SparseKVCache, Array, Array]:
        """Bookkeeping for a chunk of ``T`` tokens about to be written at slot ``start``.

        Returns the cache with segment ids, streaming slots, counts and length advanced, the chunk tokens'
        streaming-pool targets ``[B, T]`` (``stream_slots`` = not kept) and their ranks ``[B, T]``.
        """
        T = segment_ids_BT.shape[1]
        seg_BT = segment_ids_BT.astype(jnp.int32)
        visible = seg_BT >= 0
        rank = self.num_valid[:, None] + jnp.cumsum(visible, axis=1) - 1
        num_valid = self.num_valid + jnp.sum(visible, axis=1).astype(jnp.int32)
        target = _stream_target(rank, visible, num_valid, self.geometry)
        slots = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), seg_BT.shape)
        cache = dataclasses.replace(
            self,
            segment_ids=jax.lax.dynamic_update_slice(self.segment_ids, seg_BT, (0, start)),
            stream_slot=_scatter_rows(self.stream_slot, target, slots),
            num_valid=num_valid,
            length=start + T,
        )
        return cache, target, jnp.where(visible, rank, -1)

    def write_retrieval(self, layer: int, start: Array, k_BKTH: Array, v_BKTH: Array) -> SparseKVCache:
        """Store a chunk's retrieval-head keys / values at ``start`` and refresh the touched logical pages' min / max.

        Needs the chunk's segment ids already written (:meth:`with_chunk`).
        """
        T = k_BKTH.shape[2]
        dtype = self.k[layer].dtype
        k = jax.lax.dynamic_update_slice(self.k[layer], k_BKTH.astype(dtype), (0, 0, start, 0))
        v = jax.lax.dynamic_update_slice(self.v[layer], v_BKTH.astype(dtype), (0, 0, start, 0))
        lp = self.geometry.logical_page_size
        num_pages = self.k_min[layer].shape[2]
        touched = min(num_pages, T // lp + 2)  # logical pages a chunk of T slots can overlap
        first = jnp.clip(start // lp, 0, num_pages - touched)
        k_part = jax.lax.dynamic_slice_in_dim(k, first * lp, touched * lp, axis=2)
        seg_part = jax.lax.dynamic_slice_in_dim(self.segment_ids, first * lp, touched * lp, axis=1)
        lo, hi = _page_min_max(k_part, seg_part, lp)
        k_min = jax.lax.dynamic_update_slice(self.k_min[layer], lo, (0, 0, first, 0))
        k_max = jax.lax.dynamic_update_slice(self.k_max[layer], hi, (0, 0, first, 0))
        return dataclasses.replace(
            self,
            k=replace_layer(self.k, layer, k),
            v=replace_layer(self.v, layer, v),
            k_min=replace_layer(self.k_min, layer, k_min),
            k_max=replace_layer(self.k_max, layer, k_max),
        )

    def write_strided(self, layer: int, rank_BT: Array, k_BKTH: Array, v_BKTH: Array) -> SparseKVCache:
        """Store a chunk's keys / values of a strided layer at their ranks (``-1``: not kept), from
        :meth:`with_chunk`: its pool is compacted, slot = rank, so its pages are the pattern's blocks."""
        target_BT = jnp.where(rank_BT >= 0, rank_BT, self.capacity)
        return dataclasses.replace(
            self,
            k=replace_layer(self.k, layer, _scatter_heads(self.k[layer], target_BT, k_BKTH)),
            v=replace_layer(self.v, layer, _scatter_heads(self.v[layer], target_BT, v_BKTH)),
        )

    def write_streaming(self, layer: int, target_BT: Array, k_BKTH: Array, v_BKTH: Array) -> SparseKVCache:
        """Scatter a chunk's streaming-head keys / values into their sink / ring slots (``target_BT``, from
        :meth:`with_chunk`)."""
        return dataclasses.replace(
            self,
            stream_k=replace_layer(self.stream_k, layer, _scatter_heads(self.stream_k[layer], target_BT, k_BKTH)),
            stream_v=replace_layer(self.stream_v, layer, _scatter_heads(self.stream_v[layer], target_BT, v_BKTH)),
        )

    def with_selection(self, layer: int, selected: Array) -> SparseKVCache:
        """The cache with layer ``layer``'s stored page selection ``[B, retrieval heads, stored pages]`` replaced."""
        return dataclasses.replace(self, selected=replace_layer(self.selected, layer, selected))


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _retrieval_counts(sparsity: SparsityConfig, num_layers: int | None, num_kv_heads: int) -> tuple[int, ...]:
    if num_layers is None:
        if sparsity.streaming_heads is None:
            raise InputError("num_layers is needed when the sparsity config has no streaming_heads")
        num_layers = len(sparsity.streaming_heads)
    mask = sparsity.streaming_mask(num_layers, num_kv_heads)
    if np.any(mask[:, :-1] & ~mask[:, 1:]):
        raise InputError(
            "streaming_heads must list each layer's retrieval heads first (reorder the model with reorder_heads and "
            "use SparsityConfig.retrieval_first())"
        )
    return tuple(int(n) for n in (~mask).sum(axis=1))


def _stream_target(rank: Array, visible: Array, num_valid: Array, geometry: SparseGeometry) -> Array:
    """Streaming-pool slot of each token: ``rank`` in the sink, the ring for the latest ``local`` ranks, else
    ``stream_slots`` (not kept)."""
    sink, local, dropped = geometry.sink, geometry.local, geometry.stream_slots
    recent = rank >= jnp.maximum(num_valid[:, None] - local, sink)
    target = jnp.where(rank < sink, rank, jnp.where(recent, sink + rank % local, dropped))
    return jnp.where(visible, target, dropped).astype(jnp.int32)


def _scatter_rows(dest: Array, target_BT: Array, values_BT: Array) -> Array:
    """``dest[b, target[b, t]] = values[b, t]``, dropping targets past the end."""
    return jax.vmap(lambda d, t, x: d.at[t].set(x, mode="drop"))(dest, target_BT, values_BT)


def _scatter_heads(dest: Array, target_BT: Array, values_BKTH: Array) -> Array:
    """``dest[b, :, target[b, t]] = values[b, :, t]``, dropping targets past the end."""
    values_BKTH = values_BKTH.astype(dest.dtype)
    return jax.vmap(lambda d, t, x: d.at[:, t].set(x, mode="drop"))(dest, target_BT, values_BKTH)


def _page_min_max(k_BKSH: Array, seg_BS: Array, lp: int) -> tuple[Array, Array]:
    """Per-channel min / max of the visible keys of each logical page of ``lp`` slots (zero for an empty page)."""
    B, K, S, H = k_BKSH.shape
    k = k_BKSH.reshape(B, K, S // lp, lp, H)
    visible = (seg_BS >= 0).reshape(B, 1, S // lp, lp, 1)
    any_visible = jnp.any(visible, axis=3)
    lo = jnp.min(jnp.where(visible, k, jnp.inf), axis=3)
    hi = jnp.max(jnp.where(visible, k, -jnp.inf), axis=3)
    zero = jnp.zeros((), k.dtype)
    return jnp.where(any_visible, lo, zero), jnp.where(any_visible, hi, zero)
