"""The KV memory of sparse decoding: a paged pool for retrieval heads and a sink + ring pool for streaming heads.

After :func:`~qv_jax.attention.sparsity.reorder_heads`, layer ``l`` has ``R_l`` retrieval KV heads followed by
``S_l`` streaming heads. :class:`SparseKVCache` keeps, per layer:

- **Retrieval pool** ``k``/``v [B, R_l, C, H]``: every slot of the context, read as pages ``[B, R_l, C / P, P, H]``
  (a free reshape; pages are the slots ``[p P, (p + 1) P)`` of a row, so no page table is needed), plus
  ``k_min``/``k_max [B, R_l, C / lp, H]``: the per-channel minimum and maximum of the visible keys of each logical
  page of ``lp`` slots (zero when it has none), recomputed for the logical pages a write touches.
- **Streaming pool** ``stream_k``/``stream_v [B, S_l, W, H]``: ``sink`` slots for the first ``sink`` tokens of the
  row, then a ring of ``local`` slots for its most recent tokens, padded to whole pages (``W``). A token's place is
  decided by its *rank* (how many visible tokens of the row precede it): rank ``r < sink`` goes to sink slot ``r``,
  otherwise to ring slot ``sink + r % local``. Counting ranks rather than slots keeps the window at ``local`` real
  tokens when a row has padding.

Shared by all layers: ``segment_ids [B, C]`` (like :class:`~qv_jax.cache.dense.KVCache`: ``-1`` = padding or not
written), ``stream_slot [B, W]`` (the cache slot of the token each streaming slot holds, ``-1`` if none),
``num_valid [B]`` (visible tokens so far), ``length`` (slots written, shared by the rows), and the page selection
state of the retrieval heads (``selected`` per layer ``[B, R_l, budget / P - 1]``, ``selected_at``: the length at
the last selection, ``-1`` for none).

The cache is a pytree (the static :class:`SparseLayout` rides along as metadata) that jitted steps donate and
update in place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qv_jax.attention.sparsity import SparsityConfig
from qv_jax.cache.dense import KVCache
from qv_jax.errors import InputError

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SparseLayout:
    """The static shape of sparse decoding: pool geometry, selection rule and the backend that runs it."""

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

    @classmethod
    def from_config(cls, sparsity: SparsityConfig) -> SparseLayout:
        backend, kernel = sparsity.resolve_backend()
        return cls(
            sink=sparsity.sink,
            local=sparsity.local,
            stream_slots=sparsity.stream_slots,
            page_size=sparsity.page_size,
            logical_page_size=sparsity.logical_page_size,
            token_budget=sparsity.token_budget,
            reselect_every=sparsity.reselect_every,
            backend=backend,
            kernel=kernel,
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

    Per layer with ``R`` retrieval and ``S`` streaming heads, in the cache dtype: ``2 R C H`` (keys and values)
    ``+ 2 R (C / lp) H`` (key min / max) ``+ 2 S W H`` (sink + ring); plus int32 bookkeeping shared by the layers:
    ``B C`` segment ids, ``B W`` streaming slots, ``B`` counts, and ``B R (n - 1)`` selected pages per layer, with
    ``n = min(budget, C) / P``.
    """
    item = jnp.dtype(dtype).itemsize
    C = sparsity.padded_capacity(capacity)
    W = sparsity.stream_slots
    lp = sparsity.logical_page_size
    n_older = sparsity.stored_selection(C)
    total = 0
    for R in sparsity.retrieval_heads(num_layers, num_kv_heads):
        S = num_kv_heads - R
        total += batch * head_dim * item * (2 * R * C + 2 * R * (C // lp) + 2 * S * W)
        total += 4 * batch * R * n_older
    return total + 4 * (batch * C + batch * W + batch + 2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseKVCache:
    """Retrieval pages with key min / max, streaming sink + ring buffers, and page-selection state (see module)."""

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    k_min: tuple[Array, ...]
    k_max: tuple[Array, ...]
    stream_k: tuple[Array, ...]
    stream_v: tuple[Array, ...]
    segment_ids: Array
    stream_slot: Array
    num_valid: Array
    length: Array
    selected: tuple[Array, ...]
    selected_at: Array
    layout: SparseLayout = dataclasses.field(metadata=dict(static=True))

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
    ) -> SparseKVCache:
        """An empty cache for ``capacity`` slots (rounded up to ``sparsity.capacity_multiple``).

        ``sparsity.streaming_heads`` must be in retrieval-first order (:meth:`SparsityConfig.retrieval_first`);
        ``num_layers`` is needed only when it has no streaming heads.
        """
        layout = SparseLayout.from_config(sparsity)
        retrieval = _retrieval_counts(sparsity, num_layers, num_kv_heads)
        if min(batch, capacity, head_dim) <= 0:
            raise InputError(f"cache sizes must be positive: batch={batch} capacity={capacity} head_dim={head_dim}")
        C = sparsity.padded_capacity(capacity)
        W = layout.stream_slots
        n_older = sparsity.stored_selection(C)
        pool = [(batch, R, C, head_dim) for R in retrieval]
        stats = [(batch, R, C // layout.logical_page_size, head_dim) for R in retrieval]
        stream = [(batch, num_kv_heads - R, W, head_dim) for R in retrieval]
        return cls(
            k=tuple(jnp.zeros(s, dtype) for s in pool),
            v=tuple(jnp.zeros(s, dtype) for s in pool),
            k_min=tuple(jnp.zeros(s, dtype) for s in stats),
            k_max=tuple(jnp.zeros(s, dtype) for s in stats),
            stream_k=tuple(jnp.zeros(s, dtype) for s in stream),
            stream_v=tuple(jnp.zeros(s, dtype) for s in stream),
            segment_ids=jnp.full((batch, C), -1, jnp.int32),
            stream_slot=jnp.full((batch, W), -1, jnp.int32),
            num_valid=jnp.zeros((batch,), jnp.int32),
            length=jnp.zeros((), jnp.int32),
            selected=tuple(jnp.zeros((batch, R, n_older), jnp.int32) for R in retrieval),
            selected_at=jnp.full((), -1, jnp.int32),
            layout=layout,
        )

    @classmethod
    def from_dense(cls, cache: KVCache, sparsity: SparsityConfig, *, capacity: int | None = None) -> SparseKVCache:
        """The sparse decode state of a prefilled dense cache (e.g. QuickPrefill's pruned cache).

        The dense cache's KV heads must be in the retrieval-first order of ``sparsity.streaming_heads`` (the model
        that filled it was reordered by :func:`~qv_jax.attention.sparsity.reorder_heads`). Retrieval heads keep
        every slot; a streaming head keeps the first ``sink`` visible tokens of each row and the ``local`` latest.
        ``capacity`` (slots, default the dense capacity) must leave room for the tokens still to be decoded.
        Runs eagerly or under ``jit`` (static shapes only).
        """
        B, K, S, H = cache.k[0].shape
        retrieval = _retrieval_counts(sparsity, cache.num_layers, K)
        out = cls.create(
            sparsity,
            num_kv_heads=K,
            batch=B,
            capacity=S if capacity is None else capacity,
            head_dim=H,
            dtype=cache.k[0].dtype,
            num_layers=cache.num_layers,
        )
        C = out.capacity
        if C < S:
            raise InputError(f"capacity {C} is smaller than the dense cache's {S} slots")
        layout = out.layout
        seg = (
            jnp.full((B, C), -1, jnp.int32)
            .at[:, :S]
            .set(jnp.where(jnp.arange(S) < cache.length, cache.segment_ids, -1))
        )
        visible = seg[:, :S] >= 0
        rank = jnp.cumsum(visible, axis=1) - 1
        num_valid = jnp.sum(visible, axis=1).astype(jnp.int32)
        target = _stream_target(rank, visible, num_valid, layout)
        stream_slot = _scatter_rows(out.stream_slot, target, jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)))
        k, v, k_min, k_max, stream_k, stream_v = [], [], [], [], [], []
        for layer, R in enumerate(retrieval):
            dk, dv = cache.k[layer], cache.v[layer]
            pk = out.k[layer].at[:, :, :S].set(dk[:, :R])
            k.append(pk)
            v.append(out.v[layer].at[:, :, :S].set(dv[:, :R]))
            lo, hi = _page_min_max(pk, seg, layout.logical_page_size)
            k_min.append(lo)
            k_max.append(hi)
            stream_k.append(_scatter_heads(out.stream_k[layer], target, dk[:, R:]))
            stream_v.append(_scatter_heads(out.stream_v[layer], target, dv[:, R:]))
        return dataclasses.replace(
            out,
            k=tuple(k),
            v=tuple(v),
            k_min=tuple(k_min),
            k_max=tuple(k_max),
            stream_k=tuple(stream_k),
            stream_v=tuple(stream_v),
            segment_ids=seg,
            stream_slot=stream_slot,
            num_valid=num_valid,
            length=jnp.asarray(cache.length, jnp.int32),
        )

    # ---- shapes ------------------------------------------------------------------------------------------------

    @property
    def batch(self) -> int:
        return self.segment_ids.shape[0]

    @property
    def capacity(self) -> int:
        return self.segment_ids.shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the cache holds."""
        return int(sum(x.nbytes for x in jax.tree.leaves(self)))

    def retrieval_heads(self, layer: int) -> int:
        return self.k[layer].shape[1]

    def streaming_heads(self, layer: int) -> int:
        return self.stream_k[layer].shape[1]

    # ---- writes (used by the prefill / decode handlers of qv_jax.runtime.sparse) ---------------------------------

    def with_chunk(self, start: Array, segment_ids_BT: Array) -> tuple[SparseKVCache, Array, Array]:
        """Bookkeeping for a chunk of ``T`` tokens about to be written at slot ``start``.

        Returns the cache with segment ids, streaming slots, counts and length advanced,
        the chunk tokens' streaming-pool targets ``[B, T]`` (``W`` = not kept) and their ranks ``[B, T]``.
        """
        T = segment_ids_BT.shape[1]
        seg_BT = segment_ids_BT.astype(jnp.int32)
        visible = seg_BT >= 0
        rank = self.num_valid[:, None] + jnp.cumsum(visible, axis=1) - 1
        num_valid = self.num_valid + jnp.sum(visible, axis=1).astype(jnp.int32)
        target = _stream_target(rank, visible, num_valid, self.layout)
        slots = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), seg_BT.shape)
        cache = dataclasses.replace(
            self,
            segment_ids=jax.lax.dynamic_update_slice(self.segment_ids, seg_BT, (0, start)),
            stream_slot=_scatter_rows(self.stream_slot, target, slots),
            num_valid=num_valid,
            length=start + T,
        )
        return cache, target, jnp.where(visible, rank, -1)

    def write_retrieval(self, layer: int, start: Array, k_BRTH: Array, v_BRTH: Array) -> SparseKVCache:
        """Store a chunk's retrieval-head keys / values at ``start`` and refresh the touched logical pages' min / max.

        Needs the chunk's segment ids already written (:meth:`with_chunk`).
        """
        T = k_BRTH.shape[2]
        dtype = self.k[layer].dtype
        k = jax.lax.dynamic_update_slice(self.k[layer], k_BRTH.astype(dtype), (0, 0, start, 0))
        v = jax.lax.dynamic_update_slice(self.v[layer], v_BRTH.astype(dtype), (0, 0, start, 0))
        lp = self.layout.logical_page_size
        num_pages = self.k_min[layer].shape[2]
        touched = min(num_pages, T // lp + 2)  # logical pages a chunk of T slots can overlap
        first = jnp.clip(start // lp, 0, num_pages - touched)
        k_part = jax.lax.dynamic_slice_in_dim(k, first * lp, touched * lp, axis=2)
        seg_part = jax.lax.dynamic_slice_in_dim(self.segment_ids, first * lp, touched * lp, axis=1)
        lo, hi = _page_min_max(k_part, seg_part, lp)
        return dataclasses.replace(
            self,
            k=_put(self.k, layer, k),
            v=_put(self.v, layer, v),
            k_min=_put(self.k_min, layer, jax.lax.dynamic_update_slice(self.k_min[layer], lo, (0, 0, first, 0))),
            k_max=_put(self.k_max, layer, jax.lax.dynamic_update_slice(self.k_max[layer], hi, (0, 0, first, 0))),
        )

    def write_streaming(self, layer: int, target_BT: Array, k_BSTH: Array, v_BSTH: Array) -> SparseKVCache:
        """Scatter a chunk's streaming-head keys / values into their sink / ring slots (``target_BT``, from
        :meth:`with_chunk`)."""
        return dataclasses.replace(
            self,
            stream_k=_put(self.stream_k, layer, _scatter_heads(self.stream_k[layer], target_BT, k_BSTH)),
            stream_v=_put(self.stream_v, layer, _scatter_heads(self.stream_v[layer], target_BT, v_BSTH)),
        )

    def with_selection(self, layer: int, selected_BRN: Array) -> SparseKVCache:
        return dataclasses.replace(self, selected=_put(self.selected, layer, selected_BRN))


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


def _put(items: tuple, index: int, value) -> tuple:
    return (*items[:index], value, *items[index + 1 :])


def _stream_target(rank: Array, visible: Array, num_valid: Array, layout: SparseLayout) -> Array:
    """Streaming-pool slot of each token: ``rank`` in the sink, the ring for the latest ``local`` ranks, else ``W``."""
    sink, local, W = layout.sink, layout.local, layout.stream_slots
    recent = rank >= jnp.maximum(num_valid[:, None] - local, sink)
    target = jnp.where(rank < sink, rank, jnp.where(recent, sink + rank % local, W))
    return jnp.where(visible, target, W).astype(jnp.int32)


def _scatter_rows(dest_BW: Array, target_BT: Array, values_BT: Array) -> Array:
    """``dest[b, target[b, t]] = values[b, t]``, dropping targets past the end."""
    return jax.vmap(lambda d, t, x: d.at[t].set(x, mode="drop"))(dest_BW, target_BT, values_BT)


def _scatter_heads(dest_BSWH: Array, target_BT: Array, values_BSTH: Array) -> Array:
    """``dest[b, :, target[b, t]] = values[b, :, t]``, dropping targets past the end."""
    values_BSTH = values_BSTH.astype(dest_BSWH.dtype)
    return jax.vmap(lambda d, t, x: d.at[:, t].set(x, mode="drop"))(dest_BSWH, target_BT, values_BSTH)


def _page_min_max(k_BRSH: Array, seg_BS: Array, lp: int) -> tuple[Array, Array]:
    """Per-channel min / max of the visible keys of each logical page of ``lp`` slots (zero for an empty page)."""
    B, R, S, H = k_BRSH.shape
    k = k_BRSH.reshape(B, R, S // lp, lp, H)
    visible = (seg_BS >= 0).reshape(B, 1, S // lp, lp, 1)
    any_visible = jnp.any(visible, axis=3)
    lo = jnp.min(jnp.where(visible, k, jnp.inf), axis=3)
    hi = jnp.max(jnp.where(visible, k, -jnp.inf), axis=3)
    zero = jnp.zeros((), k.dtype)
    return jnp.where(any_visible, lo, zero), jnp.where(any_visible, hi, zero)
