"""Attention entry points that work on one device and on a mesh: the mesh layer above ``qv_jax.attention.local``.

XLA partitions the jnp reference by itself, but a Pallas call is opaque to it: left alone it would be gathered
onto every device and run whole. Under a context mesh (``qv_jax.sharding.mesh.context_mesh``, set by the runtime
around a sharded model's steps) each device runs the kernel on its own KV heads (with their query heads) and rows.
Attention never mixes heads or rows, so the result is exactly the unsharded one. Calls only go down to ``local``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from qv_jax.attention import local
from qv_jax.attention.backends import CHUNKED, INTERPRETED, REFERENCE, Backend, Kernel, kernel_impl
from qv_jax.attention.patterns import HeadPattern, normalize_patterns
from qv_jax.sharding.layout import per_shard, shard_by_layouts
from qv_jax.sharding.mesh import MODEL_AXIS, context_mesh

Array = jax.Array


def sparse_attention(
    q: Array,
    k: Array,
    v: Array,
    patterns: HeadPattern | tuple[HeadPattern, ...] | list[HeadPattern],
    segment_ids=None,
    causal: bool = True,
    backend: str = Backend.REFERENCE,
    block_q: int | None = None,
    block_kv: int | None = None,
    *,
    kernel: str | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """Attention of ``q [B, N, T, H]`` over ``k`` / ``v [B, K, S, H]`` where each KV head follows its pattern.

    Args:
      q, k, v: queries and keys / values; for ``T < S`` the queries are the last ``T`` positions (chunked
        prefill after a cache).
      patterns: one :class:`HeadPattern` for all KV heads, or one per KV head (a group's query heads share it).
      segment_ids: ``None``, key ids ``[B, S]`` (queries take the last ``T``) or a pair ``(q ids [B, T], kv ids
        [B, S])``; a query sees only keys with its id, and negative key ids never.
      causal: ``False`` for vision.
      backend: ``"reference"`` (the jnp oracle; ``"xla"`` is its former name), ``"chunked"`` (the kernels' tiles in
        jnp), ``"interpret"`` or ``"pallas"`` (``qv_jax.attention.backends``).
      block_q, block_kv: kernel tiles, default the kernel's production tiles.
      kernel: ``"tpu"`` or ``"gpu"``; default ``tpu`` when interpreting, the device's for ``pallas``.
      scale: logit scale, default ``H ** -0.5``.
      return_lse: also return the log-sum-exp.

    Returns:
      ``[B, N, T, H]`` in ``q.dtype`` (and ``lse [B, N, T]`` float32); a query that sees nothing gets zeros and
      ``lse = -inf``.
    """
    mesh = context_mesh()
    impl, _ = kernel_impl(backend, kernel)
    run = functools.partial(
        local.sparse_attention, causal=causal, backend=backend, block_q=block_q, block_kv=block_kv, scale=scale
    )
    if mesh is None or impl in (REFERENCE, CHUNKED):  # XLA partitions the jnp paths by itself
        return run(q, k, v, patterns, segment_ids, kernel=kernel, return_lse=return_lse)
    return sharded_sparse_attention(
        q,
        k,
        v,
        patterns,
        segment_ids,
        causal,
        backend,
        block_q,
        block_kv,
        mesh=mesh,
        kernel=impl,
        scale=scale,
        return_lse=return_lse,
    )


def sharded_sparse_attention(
    q: Array,
    k: Array,
    v: Array,
    patterns: HeadPattern | Sequence[HeadPattern],
    segment_ids=None,
    causal: bool = True,
    backend: str = Backend.PALLAS,
    block_q: int | None = None,
    block_kv: int | None = None,
    *,
    mesh,
    kernel: str | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """:func:`sparse_attention` with each device of ``mesh`` running its own KV heads and rows.

    ``patterns`` name the KV heads of the whole ``k``; a model axis that does not divide them leaves every device
    all heads of its rows. Per-head patterns differ from shard to shard and block tables are static, so each
    distinct set of local patterns gets its own kernel and each device picks its own with ``lax.switch`` on its
    position along ``"model"``. On CPU, ``backend="interpret"`` interprets the GPU kernel unless ``kernel`` says
    otherwise.
    """
    B, K = k.shape[0], k.shape[1]
    split_heads = K % mesh.shape[MODEL_AXIS] == 0
    local_heads = K // mesh.shape[MODEL_AXIS] if split_heads else K
    patterns = normalize_patterns(patterns, K)
    shard_patterns = [patterns[i * local_heads : (i + 1) * local_heads] for i in range(K // local_heads)]
    variants = list(dict.fromkeys(shard_patterns))
    branch_of_shard = [variants.index(p) for p in shard_patterns]

    segments: tuple[Array, ...] = ()
    seg_layouts: tuple[str, ...] = ()
    if isinstance(segment_ids, tuple | list):
        segments = tuple(jnp.broadcast_to(jnp.asarray(s), (B, s.shape[-1])) for s in segment_ids)
        seg_layouts = ("BT", "BS")
    elif segment_ids is not None:
        segments = (jnp.broadcast_to(jnp.asarray(segment_ids), (B, segment_ids.shape[-1])),)
        seg_layouts = ("BS",)

    if backend in INTERPRETED and kernel is None:
        # the TPU interpreter simulates every device of a shard_map with barriers between them, which hangs when
        # XLA's CPU client does not run all the shards at once; the GPU kernel interprets shard by shard
        kernel = Kernel.GPU
    run = functools.partial(
        local.sparse_attention,
        causal=causal,
        backend=backend,
        block_q=block_q,
        block_kv=block_kv,
        kernel=kernel,
        scale=scale,
        return_lse=True,
    )

    def local_attention(q, k, v, *segs):
        local_segments = None if not segs else (segs if len(segs) == 2 else segs[0])
        branches = [functools.partial(run, q, k, v, p, local_segments) for p in variants]
        if len(branches) == 1:
            return branches[0]()
        index = jnp.asarray(branch_of_shard, jnp.int32)[jax.lax.axis_index(MODEL_AXIS)]
        return jax.lax.switch(index, branches)

    operands = (q, k, v, *segments)
    fn = shard_by_layouts(
        local_attention,
        mesh,
        in_layouts=("BNTH", "BKSH", "BKSH", *seg_layouts),
        out_layouts=("BNTH", "BNT"),
        shapes=[x.shape for x in operands],
        split_heads=split_heads,
    )
    out, lse = fn(*operands)
    return (out, lse) if return_lse else out


def paged_decode_attention(
    q: Array,
    k_pages: Array,
    v_pages: Array,
    token_valid: Array,
    page_indices: Array,
    page_counts: Array,
    *,
    backend: str = Backend.REFERENCE,
    kernel: str | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
) -> tuple[Array, Array]:
    """Attention of one decode token per row over listed KV pages.

    Args:
      q: ``[B, K, G, H]``, the ``G`` query heads of each KV head.
      k_pages, v_pages: ``[B, K, pages, page_size, H]``.
      token_valid: ``[B, pages, page_size]`` bool, the visible tokens (shared by the heads).
      page_indices: ``[B, K, listed]``; the first ``page_counts [B, K]`` entries are the distinct pages read.
      backend, kernel: as for :func:`sparse_attention`.
      scale: logit scale, default ``H ** -0.5``.
      num_splits: split-K parts of the Pallas kernels (merged by log-sum-exp), default by list length.

    Returns:
      ``out [B, K, G, H]`` in ``q.dtype`` and the log-sum-exp ``[B, K, G]`` float32.
    """
    run = functools.partial(
        local.paged_decode_attention, backend=backend, kernel=kernel, scale=scale, num_splits=num_splits
    )
    operands = (q, k_pages, v_pages, token_valid, page_indices, page_counts)
    if kernel_impl(backend, kernel)[0] in (REFERENCE, CHUNKED):
        return run(*operands)
    return per_shard(
        run, *operands, in_layouts=("BKGH", "BK..H", "BK..H", "B..", "BK.", "BK"), out_layouts=("BKGH", "BKG")
    )


def dense_decode_attention(
    q: Array,
    k: Array,
    v: Array,
    visible: Array,
    *,
    page_size: int,
    backend: str = Backend.REFERENCE,
    kernel: str | None = None,
    scale: float | None = None,
) -> tuple[Array, Array]:
    """One decode token per row, ``q [B, K, G, H]``, over a dense cache ``k`` / ``v [B, K, S, H]`` (``S`` a multiple
    of ``page_size``) whose visible slots are ``visible [B, S]``: ``(out [B, K, G, H], lse [B, K, G])``."""
    run = functools.partial(
        local.dense_decode_attention, page_size=page_size, backend=backend, kernel=kernel, scale=scale
    )
    if kernel_impl(backend, kernel)[0] in (REFERENCE, CHUNKED):
        return run(q, k, v, visible)
    return per_shard(run, q, k, v, visible, in_layouts=("BKGH", "BK.H", "BK.H", "B."), out_layouts=("BKGH", "BKG"))


def logical_page_scores(
    q: Array,
    k_min: Array,
    k_max: Array,
    page_valid: Array,
    *,
    backend: str = Backend.REFERENCE,
    kernel: str | None = None,
) -> Array:
    """LServe's bound of ``q [B, K, G, H] . k`` per KV head and logical page (``k_min`` / ``k_max [B, K,
    logical_pages, H]``, ``page_valid [B, logical_pages]``): ``[B, K, logical_pages]`` float32."""
    run = functools.partial(local.logical_page_scores, backend=backend, kernel=kernel)
    if kernel_impl(backend, kernel)[0] in (REFERENCE, CHUNKED):
        return run(q, k_min, k_max, page_valid)
    return per_shard(run, q, k_min, k_max, page_valid, in_layouts=("BKGH", "BK.H", "BK.H", "B."), out_layouts="BK.")
