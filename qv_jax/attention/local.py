"""Attention on one device (or one shard): each call runs the jnp reference or a Pallas kernel.

Three kernel families: block-sparse prefill (:func:`sparse_attention`), paged decode
(:func:`paged_decode_attention`, and :func:`dense_decode_attention` over a dense cache) and LServe's page scores
(:func:`logical_page_scores`). The ``jax`` backends hand a call to jax's shipped kernel where one serves it
(:func:`shipped_attention`) and run ours otherwise. Nothing here knows about meshes: ``qv_jax.attention.sharded``
runs these per shard and is what the model calls. See docs/attention.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qv_jax.attention.backends import CHUNKED, DEFAULT_BLOCKS, REFERENCE, SHIPPED, Backend, Kernel, kernel_impl
from qv_jax.attention.patterns import HeadPattern, StreamingPattern, normalize_patterns, pattern_mask
from qv_jax.attention.reference import check_shapes, dot_product_attention
from qv_jax.attention.tables import block_tables
from qv_jax.errors import InputError
from qv_jax.kernels import jax_gpu, jax_tpu, paged_decode
from qv_jax.kernels.block_sparse import block_sparse_attention
from qv_jax.kernels.padding import next_pow2
from qv_jax.kernels.page_select import logical_page_scores as _kernel_page_scores

Array = jax.Array


def split_segment_ids(segment_ids, B: int, T: int, S: int) -> tuple[Array | None, Array | None]:
    """``(q ids [B, T], kv ids [B, S])`` from ``None``, key ids ``[B, S]`` (queries take the last ``T``) or a pair."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, tuple | list):
        if len(segment_ids) != 2:
            raise InputError("segment_ids: expected kv ids [B, S] or a pair (q ids [B, T], kv ids [B, S])")
        q_seg, kv_seg = (jnp.asarray(x) for x in segment_ids)
    else:
        kv_seg = jnp.asarray(segment_ids)
        q_seg = None
    if kv_seg.shape not in ((B, S), (S,)):
        raise InputError(f"segment_ids: kv ids must be [B, S] = {(B, S)}, got {kv_seg.shape}")
    kv_seg_BS = jnp.broadcast_to(kv_seg, (B, S))
    if q_seg is None:  # queries are the last T positions
        q_seg = kv_seg_BS[:, S - T :]
    elif q_seg.shape not in ((B, T), (T,)):
        raise InputError(f"segment_ids: q ids must be [B, T] = {(B, T)}, got {q_seg.shape}")
    if not jnp.issubdtype(kv_seg_BS.dtype, jnp.integer) or not jnp.issubdtype(q_seg.dtype, jnp.integer):
        raise InputError("segment_ids must be integer arrays")
    return jnp.broadcast_to(q_seg, (B, T)), kv_seg_BS


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
    """Attention of ``q [B, N, T, H]`` over ``k`` / ``v [B, K, S, H]``, each KV head following its pattern.

    The arguments are those of :func:`qv_jax.attention.sparse_attention`, which calls this on each shard.
    """
    check_shapes(q, k, v)
    B, _, T, _ = q.shape
    K, S = k.shape[1], k.shape[2]
    if T > S:
        raise InputError(f"q has {T} positions but k only {S}: queries are the last T of S")
    impl, interpret = kernel_impl(backend, kernel)
    patterns = normalize_patterns(patterns, K)
    q_seg, kv_seg = split_segment_ids(segment_ids, B, T, S)
    if backend in SHIPPED:
        own_ids = segment_ids is None or not isinstance(segment_ids, tuple | list)
        shipped = shipped_attention(q, k, v, patterns, q_seg, kv_seg, causal, impl, interpret, scale, own_ids=own_ids)
        if shipped is not None:
            return shipped if return_lse else shipped[0]

    if impl == REFERENCE:
        for p in dict.fromkeys(patterns):
            p.validate(S)
        mask = None
        if not all(p.is_dense for p in patterns):
            mask = jnp.broadcast_to(pattern_mask(patterns, T, S, causal=causal, xp=jnp)[None], (B, K, T, S))
        return dot_product_attention(
            q,
            k,
            v,
            causal=causal,
            q_segment_ids=q_seg,
            kv_segment_ids=kv_seg,
            mask=mask,
            scale=scale,
            return_lse=return_lse,
        )
    default_q, default_kv = DEFAULT_BLOCKS[impl]
    if impl == CHUNKED:
        # jnp pays for every padded query row: a decode token or a short question gets a tile of its own size
        default_q = min(default_q, max(8, next_pow2(T)))
    tables = block_tables(
        patterns, T, S, num_kv_heads=K, causal=causal, block_q=block_q or default_q, block_kv=block_kv or default_kv
    )
    out, lse = block_sparse_attention(
        q, k, v, tables, q_segment_ids=q_seg, kv_segment_ids=kv_seg, scale=scale, impl=impl, interpret=interpret
    )
    return (out, lse) if return_lse else out


def shipped_attention(
    q, k, v, patterns, q_seg, kv_seg, causal, impl, interpret, scale, *, own_ids: bool
) -> tuple[Array, Array] | None:
    """``(out, lse)`` from jax's kernel of the ``impl`` family where it serves the call, else ``None``.

    TPU: splash attention, for dense and streaming heads (``T <= S``, segment ids or none). GPU: ``mha``, for
    dense heads of a chunk over itself (``T == S``, one id per token: ``own_ids``). Strided and block-mask heads, and
    on GPU a chunk over a memory, stay on ours (docs/attention.md, "jax's kernels").
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl == Kernel.TPU:
        if not all(p.is_dense or isinstance(p, StreamingPattern) for p in patterns):
            return None
        windows = tuple(None if p.is_dense else (p.sink, p.local) for p in patterns)
        return jax_tpu.splash_attention(
            q, k, v, windows, q_seg, kv_seg, causal=causal, scale=scale, interpret=interpret
        )
    if impl == Kernel.GPU and own_ids and q.shape[2] == k.shape[2] and all(p.is_dense for p in patterns):
        return jax_gpu.mha_attention(q, k, v, q_seg, causal=causal, scale=scale, interpret=interpret)
    return None


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
    """One decode token per row, ``q [B, K, G, H]``, over a dense cache ``k`` / ``v [B, K, S, H]`` of which row
    ``b`` sees the slots ``visible [B, S]``: ours reads it as pages of ``page_size`` slots; the ``jax`` backends on
    GPU run jax's decode kernel where each row's visible slots are one run (a left-padded cache), ours otherwise."""
    B, K, S, H = k.shape
    pages = S // page_size

    def ours():
        return paged_decode_attention(
            q,
            k.reshape(B, K, pages, page_size, H),
            v.reshape(B, K, pages, page_size, H),
            visible.reshape(B, pages, page_size),
            jnp.broadcast_to(jnp.arange(pages, dtype=jnp.int32), (B, K, pages)),
            jnp.full((B, K), pages, jnp.int32),
            backend=backend,
            kernel=kernel,
            scale=scale,
        )

    impl, interpret = kernel_impl(backend, kernel)
    if backend in SHIPPED and impl == Kernel.GPU:
        scale = H**-0.5 if scale is None else scale
        return jax_gpu.decode_attention(q, k, v, visible, scale=scale, fallback=ours, interpret=interpret)
    return ours()


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
    """One decode token over listed KV pages; the arguments of :func:`qv_jax.attention.paged_decode_attention`."""
    impl, interpret = _page_impl(backend, kernel)
    return paged_decode.paged_decode_attention(
        q,
        k_pages,
        v_pages,
        token_valid,
        page_indices,
        page_counts,
        scale=scale,
        impl=impl,
        interpret=interpret,
        num_splits=num_splits,
    )


def logical_page_scores(
    q: Array,
    k_min: Array,
    k_max: Array,
    page_valid: Array,
    *,
    backend: str = Backend.REFERENCE,
    kernel: str | None = None,
) -> Array:
    """LServe's bound of ``q . k`` per KV head and logical page, ``[B, K, logical_pages]`` float32."""
    impl, interpret = _page_impl(backend, kernel)
    return _kernel_page_scores(q, k_min, k_max, page_valid, impl=impl, interpret=interpret)


def _page_impl(backend: str, kernel: str | None) -> tuple[str, bool]:
    """``kernel_impl`` for the paged kernels, whose jnp reference already reads only the listed pages."""
    impl, interpret = kernel_impl(backend, kernel)
    return (REFERENCE if impl == CHUNKED else impl), interpret
