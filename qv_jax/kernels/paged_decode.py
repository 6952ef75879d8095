"""Paged decode attention: one entry point for the TPU and GPU kernels and their jnp reference.

One query token per batch row, ``q [B, K, G, H]``, against a KV pool cut into pages, ``[B, K, pages, page_size, H]``.
Each (batch row, KV head) lists the pages it reads (``page_indices [B, K, listed]``, the first ``page_counts``
entries: LServe's selected pages for a retrieval head, the sink + ring buffer for a streaming head); ``token_valid``
marks the tokens that may be seen (not padding, not slots still unwritten). ``paged_decode_attention`` pads the
query group and the page lists to what the kernel needs, runs it, and merges the split-K parts by log-sum-exp
(``flash.merge_by_lse``).

Implementations: ``"tpu"`` (Mosaic, ``kernels.paged_decode_tpu``), ``"gpu"`` (Triton, ``kernels.paged_decode_gpu``)
and ``"reference"`` (``kernels.paged_decode_reference``, no splits). ``interpret`` runs a Pallas implementation in
the CPU interpreter. Nothing crosses KV heads, so the call can be wrapped in ``shard_map`` over the head axis.
See docs/attention.md, "Sparse decoding".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qv_jax.errors import InputError
from qv_jax.kernels import paged_decode_gpu, paged_decode_reference, paged_decode_tpu
from qv_jax.kernels.flash import merge_by_lse
from qv_jax.kernels.padding import next_pow2, pad_axis, triton_dot_size

IMPLEMENTATIONS = ("tpu", "gpu", "reference")
# split-K: about this many pages per split, at most this many splits
PAGES_PER_SPLIT = 8
MAX_SPLITS = 32
# GPU: pages gathered per loop iteration (a tile of pages_per_block * page_size keys)
GPU_TOKENS_PER_BLOCK = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_splits(num_listed: int) -> int:
    """Split-K parts for a list of ``num_listed`` pages: about ``PAGES_PER_SPLIT`` pages each, at most 32."""
    return max(1, min(MAX_SPLITS, _cdiv(num_listed, PAGES_PER_SPLIT)))


def _check(q, k_pages, v_pages, token_valid, page_indices, page_counts) -> None:
    if q.ndim != 4 or k_pages.ndim != 5 or v_pages.shape != k_pages.shape:
        raise InputError(
            f"paged decode wants q [B, K, G, H] and k/v pages [B, K, pages, page_size, H]; got {q.shape}, "
            f"{k_pages.shape}, {v_pages.shape}"
        )
    B, K, _, H = q.shape
    if k_pages.shape[:2] != (B, K) or k_pages.shape[4] != H:
        raise InputError(f"q {q.shape} and k pages {k_pages.shape} disagree on batch, KV heads or head dim")
    if token_valid.shape != (B, *k_pages.shape[2:4]):
        raise InputError(
            f"token_valid must be [B, pages, page_size] = {(B, *k_pages.shape[2:4])}, got {token_valid.shape}"
        )
    if page_indices.ndim != 3 or page_indices.shape[:2] != (B, K) or page_counts.shape != (B, K):
        raise InputError(
            f"page_indices must be [B, K, listed] and page_counts [B, K] with B, K = {(B, K)}; got "
            f"{page_indices.shape}, {page_counts.shape}"
        )


def clamp_lists(page_indices, page_counts, length: int):
    """Page lists of ``length`` entries where every entry past the count repeats the last listed page.

    The kernels then never index out of the pool, and on TPU a repeated block index means no new DMA.
    """
    listed = page_indices.shape[2]
    last = jnp.maximum(page_counts - 1, 0)[..., None]
    pos = jnp.minimum(jnp.arange(length), listed - 1)
    take = jnp.minimum(pos[None, None], last)
    return jnp.take_along_axis(page_indices, take, axis=2).astype(jnp.int32)


def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    token_valid: jax.Array,
    page_indices: jax.Array,
    page_counts: jax.Array,
    *,
    scale: float | None = None,
    impl: str = "tpu",
    interpret: bool = False,
    num_splits: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Attention of one query token per batch row over listed KV pages.

    Args:
      q: ``[B, K, G, H]``, the ``G`` query heads of each KV head.
      k_pages, v_pages: ``[B, K, pages, page_size, H]``.
      token_valid: ``[B, pages, page_size]`` bool, True on visible tokens (shared by the KV heads).
      page_indices: ``[B, K, listed]`` int32, distinct pages in ``[0, pages)``.
      page_counts: ``[B, K]`` int32, how many of the listed pages are read.
      scale: logit scale, ``H ** -0.5`` by default.
      impl: one of :data:`IMPLEMENTATIONS`; ``interpret`` runs it in the CPU interpreter.
      num_splits: split-K parts, :func:`default_splits` of ``listed`` by default.

    Returns:
      ``out [B, K, G, H]`` in ``q.dtype`` and the log-sum-exp ``[B, K, G]`` float32 (``-inf`` and a zero output
      where nothing is visible).
    """
    if impl not in IMPLEMENTATIONS:
        raise InputError(f"impl={impl!r}: expected one of {IMPLEMENTATIONS}")
    _check(q, k_pages, v_pages, token_valid, page_indices, page_counts)
    B, _, G, H = q.shape
    pages, page_size = k_pages.shape[2:4]
    listed = page_indices.shape[2]
    scale = H**-0.5 if scale is None else float(scale)
    page_counts = jnp.minimum(page_counts.astype(jnp.int32), listed)
    if impl == "reference":
        return paged_decode_reference.forward(
            q, k_pages, v_pages, token_valid.astype(bool), page_indices, page_counts, scale=scale
        )

    splits = num_splits or default_splits(listed)
    valid = jnp.where(token_valid.astype(bool), 0, -1).astype(jnp.int32)
    if impl == "tpu":
        per_split = _cdiv(listed, splits)
        indices = clamp_lists(page_indices, page_counts, splits * per_split)
        out, lse = paged_decode_tpu.forward(
            q,
            k_pages,
            v_pages,
            valid.reshape(B, pages, 1, page_size),
            indices,
            page_counts,
            scale=scale,
            num_splits=splits,
            interpret=interpret,
        )
    else:
        if page_size & (page_size - 1) or H & (H - 1) or H < 16:
            raise InputError(
                f"GPU kernel: page size {page_size} and head dim {H} must be powers of two (head dim >= 16)"
            )
        per_block = max(1, min(next_pow2(_cdiv(listed, splits)), GPU_TOKENS_PER_BLOCK // page_size))
        per_split = _cdiv(_cdiv(listed, splits), per_block) * per_block
        indices = clamp_lists(page_indices, page_counts, splits * per_split)
        out, lse = paged_decode_gpu.forward(
            pad_axis(q, 2, triton_dot_size(G)),
            k_pages,
            v_pages,
            valid,
            indices,
            page_counts,
            scale=scale,
            num_splits=splits,
            pages_per_block=per_block,
            interpret=interpret,
        )
        out, lse = out[:, :, :, :G], lse[:, :, :, :G]
    out, lse = merge_by_lse(out, lse, axis=2)  # the split-K parts
    return out.astype(q.dtype), lse
