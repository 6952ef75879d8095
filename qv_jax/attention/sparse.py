"""Block-sparse attention with one pattern per KV head, on three backends that compute the same thing.

- ``xla``: the dense jnp reference (:func:`qv_jax.attention.dense.dot_product_attention`) with the patterns' element
  mask. ``O(T x S)`` memory; the CPU default and the oracle for tests.
- ``interpret``: the Pallas kernels run by the CPU interpreter (the TPU kernel unless ``kernel="gpu"``).
- ``pallas``: the Pallas kernel of the current device (``jax.default_backend()``: Mosaic on TPU, Triton on GPU).

The Pallas paths never touch a tile the patterns leave empty: patterns compile on the host into block tables
(``qv_jax.attention.patterns.compile_block_tables``, cached per shape), and the kernels walk those lists.
Segment ids are data, so they cannot shrink the tables; the kernels mask them per element and skip, at run time,
any tile whose query and key blocks have disjoint id ranges.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qv_jax.attention.dense import dot_product_attention
from qv_jax.attention.patterns import HeadPattern, compile_block_tables, normalize_patterns, pattern_mask
from qv_jax.errors import InputError
from qv_jax.kernels.block_sparse import block_sparse_attention
from qv_jax.kernels.block_tables import BlockTables

BACKENDS = ("xla", "interpret", "pallas")
KERNELS = ("tpu", "gpu")
# production tile sizes: TPU tiles fill the 128-lane vregs and the MXU; Triton tiles keep two [64, D] f32
# accumulators of the backward in registers
DEFAULT_BLOCKS = {"tpu": (128, 128), "gpu": (64, 64)}

Array = jax.Array


def default_kernel() -> str:
    """The Pallas kernel for ``jax.default_backend()``; raises on a platform that has none."""
    platform = jax.default_backend()
    if platform == "tpu":
        return "tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    raise InputError(f"backend='pallas' needs a TPU or GPU, but jax runs on {platform!r}; use 'xla' or 'interpret'")


def kernel_impl(backend: str, kernel: str | None) -> tuple[str, bool]:
    """``(impl, interpret)`` of the kernel entry points for a backend name and an optional kernel choice.

    ``"reference"`` for ``xla``; else ``kernel``, by default the device's (``pallas``) or ``"tpu"`` (``interpret``).
    """
    if backend not in BACKENDS:
        raise InputError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend == "xla":
        return "reference", False
    if kernel is None:
        kernel = default_kernel() if backend == "pallas" else "tpu"
    if kernel not in KERNELS:
        raise InputError(f"kernel={kernel!r}: expected one of {KERNELS}")
    return kernel, backend == "interpret"


def _split_segment_ids(segment_ids, B: int, T: int, S: int):
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
    kv_seg = jnp.broadcast_to(kv_seg, (B, S))
    if q_seg is None:  # queries are the last T positions
        q_seg = kv_seg[:, S - T :]
    elif q_seg.shape not in ((B, T), (T,)):
        raise InputError(f"segment_ids: q ids must be [B, T] = {(B, T)}, got {q_seg.shape}")
    if not jnp.issubdtype(kv_seg.dtype, jnp.integer) or not jnp.issubdtype(q_seg.dtype, jnp.integer):
        raise InputError("segment_ids must be integer arrays")
    return jnp.broadcast_to(q_seg, (B, T)), kv_seg


def _check(q: Array, k: Array, v: Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise InputError(f"sparse_attention wants q [B,Hq,T,D], k/v [B,Hkv,S,D]; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise InputError(f"q {q.shape} and k {k.shape} disagree on batch, head dim or GQA grouping")
    if q.shape[2] > k.shape[2]:
        raise InputError(f"q has {q.shape[2]} positions but k only {k.shape[2]}: queries are the last T of S")


def block_tables(
    patterns,
    q_len: int,
    kv_len: int,
    *,
    num_kv_heads: int,
    causal: bool = True,
    block_q: int = 128,
    block_kv: int = 128,
) -> BlockTables:
    """The (cached) block tables the Pallas backends run for these patterns and shapes."""
    return compile_block_tables(
        normalize_patterns(patterns, num_kv_heads), int(q_len), int(kv_len), int(block_q), int(block_kv), causal
    )


def visited_blocks(
    patterns,
    q_len: int,
    kv_len: int,
    *,
    num_kv_heads: int,
    causal: bool = True,
    block_q: int = 128,
    block_kv: int = 128,
) -> np.ndarray:
    """Tiles (query block x key block) the kernels visit per KV head and batch element, ``[Hkv]`` int64."""
    tables = block_tables(
        patterns, q_len, kv_len, num_kv_heads=num_kv_heads, causal=causal, block_q=block_q, block_kv=block_kv
    )
    return np.broadcast_to(tables.visited_per_head(), (num_kv_heads,)).copy()


def sparse_attention(
    q: Array,
    k: Array,
    v: Array,
    patterns: HeadPattern | tuple[HeadPattern, ...] | list[HeadPattern],
    segment_ids=None,
    causal: bool = True,
    backend: str = "xla",
    block_q: int | None = None,
    block_kv: int | None = None,
    *,
    kernel: str | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """Attention of ``q [B, Hq, T, D]`` over ``k``/``v [B, Hkv, S, D]`` where each KV head follows its pattern.

    ``patterns``: one :class:`HeadPattern` for all KV heads, or one per KV head (query heads of a group share it).
    ``segment_ids``: ``None``, key ids ``[B, S]`` (queries take the last ``T``), or a pair ``(q ids, kv ids)``;
    a query sees only keys with its id, and negative key ids never. ``causal=False`` for vision. For ``T < S`` the
    queries are the last ``T`` positions (chunked prefill after a cache).
    ``backend``: ``"xla"``, ``"interpret"`` or ``"pallas"`` (see the module doc). ``kernel`` (``"tpu"`` or ``"gpu"``)
    overrides the kernel choice: ``interpret`` defaults to ``"tpu"``, ``pallas`` to the current device's, and an
    explicit one lets ``pallas`` be traced and lowered for another platform (``.lower(lowering_platforms=...)``).
    ``block_q``/``block_kv`` default to the kernel's production tiles (``DEFAULT_BLOCKS``).
    Returns ``[B, Hq, T, D]`` in ``q.dtype`` (plus the log-sum-exp ``[B, Hq, T]`` float32 with ``return_lse``);
    a query that sees nothing gets zeros and ``lse = -inf``.
    """
    _check(q, k, v)
    impl, interpret = kernel_impl(backend, kernel)
    B, _, T, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    patterns = normalize_patterns(patterns, Hkv)
    q_seg, kv_seg = _split_segment_ids(segment_ids, B, T, S)

    if impl == "reference":
        for p in dict.fromkeys(patterns):
            p.validate(S)
        mask = None
        if not all(p.is_dense for p in patterns):
            mask = jnp.broadcast_to(pattern_mask(patterns, T, S, causal=causal, xp=jnp)[None], (B, Hkv, T, S))
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

    from qv_jax.attention.sharded import context_mesh, sharded_sparse_attention  # sharded imports this module

    mesh = context_mesh()
    if mesh is not None:  # a sharded model: XLA cannot partition a Pallas call, run it per shard
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
    default_q, default_kv = DEFAULT_BLOCKS[impl]
    tables = block_tables(
        patterns,
        T,
        S,
        num_kv_heads=Hkv,
        causal=causal,
        block_q=block_q or default_q,
        block_kv=block_kv or default_kv,
    )
    out, lse = block_sparse_attention(
        q,
        k,
        v,
        tables,
        q_segment_ids=q_seg,
        kv_segment_ids=kv_seg,
        scale=scale,
        impl=impl,
        interpret=interpret,
    )
    return (out, lse) if return_lse else out
