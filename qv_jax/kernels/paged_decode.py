"""Paged decode attention: one entry point for the TPU and GPU kernels and their jnp reference.

Decoding reads a single query token per row against a KV pool cut into pages of ``P`` tokens. Each (row, KV head)
names the pages it attends to (``page_indices``, the first ``page_counts`` entries; LServe's selected pages for a
retrieval head, all pages of the sink + ring buffer for a streaming head), and ``token_valid`` marks the tokens of a
page that may be seen (padding and slots not written yet are not). ``paged_decode_attention`` pads the query group
and the page lists to what the kernel needs, runs it, and merges the split-K partial results with their
log-sum-exp:

    lse = logsumexp_s(lse_s),   out = sum_s exp(lse_s - lse) * out_s

Implementations: ``"tpu"`` (Mosaic, ``kernels.paged_decode_tpu``), ``"gpu"`` (Triton, ``kernels.paged_decode_gpu``)
and ``"reference"`` (``kernels.paged_decode_reference``, no splits). ``interpret`` runs a Pallas implementation in
the CPU interpreter. Nothing crosses KV heads, so the call can be wrapped in ``shard_map`` over the head axis.
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
# GPU: pages gathered per loop iteration (a tile of pages_per_block * P keys)
GPU_TOKENS_PER_BLOCK = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_splits(num_listed: int) -> int:
    """Split-K parts for a list of ``num_listed`` pages: about ``PAGES_PER_SPLIT`` pages each, at most 32."""
    return max(1, min(MAX_SPLITS, _cdiv(num_listed, PAGES_PER_SPLIT)))


def _check(q, k_pages, v_pages, token_valid, page_indices, page_counts) -> None:
    if q.ndim != 4 or k_pages.ndim != 5 or v_pages.shape != k_pages.shape:
        raise InputError(
            f"paged decode wants q [B, K, G, D] and k/v pages [B, K, NP, P, D]; got {q.shape}, {k_pages.shape}, "
            f"{v_pages.shape}"
        )
    B, K, _, D = q.shape
    if k_pages.shape[:2] != (B, K) or k_pages.shape[4] != D:
        raise InputError(f"q {q.shape} and k pages {k_pages.shape} disagree on batch, KV heads or head dim")
    if token_valid.shape != (B, *k_pages.shape[2:4]):
        raise InputError(f"token_valid must be [B, NP, P] = {(B, *k_pages.shape[2:4])}, got {token_valid.shape}")
    if page_indices.ndim != 3 or page_indices.shape[:2] != (B, K) or page_counts.shape != (B, K):
        raise InputError(
            f"page_indices must be [B, K, N] and page_counts [B, K] with B, K = {(B, K)}; got "
            f"{page_indices.shape}, {page_counts.shape}"
        )


def clamp_lists(page_indices, page_counts, length: int):
    """Page lists of ``length`` entries where every entry past the count repeats the last listed page.

    The kernels then never index out of the pool, and on TPU a repeated block index means no new DMA.
    """
    N = page_indices.shape[2]
    last = jnp.maximum(page_counts - 1, 0)[..., None]
    pos = jnp.minimum(jnp.arange(length), N - 1)
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
    """Attention of one query token per row over listed KV pages.

    ``q [B, K, G, D]`` (the ``G`` query heads of each KV head), ``k_pages``/``v_pages [B, K, NP, P, D]``,
    ``token_valid [B, NP, P]`` bool (True: visible; shared by the KV heads), ``page_indices [B, K, N]`` int32
    distinct pages in ``[0, NP)`` of which the first ``page_counts [B, K]`` are read. Returns ``out [B, K, G, D]``
    in ``q.dtype`` and the log-sum-exp ``[B, K, G]`` float32 (``-inf``, zero output, where nothing is visible).
    ``num_splits`` defaults to :func:`default_splits` of ``N``.
    """
    if impl not in IMPLEMENTATIONS:
        raise InputError(f"impl={impl!r}: expected one of {IMPLEMENTATIONS}")
    _check(q, k_pages, v_pages, token_valid, page_indices, page_counts)
    B, _, G, D = q.shape
    NP, P = k_pages.shape[2:4]
    N = page_indices.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    page_counts = jnp.minimum(page_counts.astype(jnp.int32), N)
    if impl == "reference":
        return paged_decode_reference.forward(
            q, k_pages, v_pages, token_valid.astype(bool), page_indices, page_counts, scale=scale
        )

    splits = num_splits or default_splits(N)
    valid = jnp.where(token_valid.astype(bool), 0, -1).astype(jnp.int32)
    if impl == "tpu":
        per_split = _cdiv(N, splits)
        indices = clamp_lists(page_indices, page_counts, splits * per_split)
        out, lse = paged_decode_tpu.forward(
            q,
            k_pages,
            v_pages,
            valid.reshape(B, NP, 1, P),
            indices,
            page_counts,
            scale=scale,
            num_splits=splits,
            interpret=interpret,
        )
    else:
        if P & (P - 1) or D & (D - 1) or D < 16:
            raise InputError(f"GPU kernel: page size {P} and head dim {D} must be powers of two (head dim >= 16)")
        per_block = max(1, min(next_pow2(_cdiv(N, splits)), GPU_TOKENS_PER_BLOCK // P))
        per_split = _cdiv(_cdiv(N, splits), per_block) * per_block
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
