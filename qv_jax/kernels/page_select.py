"""Page-selection scores: one entry point for the TPU and GPU kernels and their jnp reference.

``logical_page_scores`` returns, for every KV head and logical page, LServe's upper bound of the attention logit
``q . k`` over the page's keys (maximised over the KV group's query heads); see ``kernels.page_select_reference``
for the rule. The caller turns these into physical-page scores and a top-k selection
(``qv_jax.attention.page_selection``). Nothing crosses KV heads (shard_map friendly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qv_jax.errors import InputError
from qv_jax.kernels import page_select_gpu, page_select_reference, page_select_tpu
from qv_jax.kernels.padding import pad_axis, triton_dot_size

IMPLEMENTATIONS = ("tpu", "gpu", "reference")
TPU_BLOCKS = (1024, 512, 256, 128)
# the whole page axis in one TPU block only while its min/max tiles stay small in VMEM
TPU_MAX_UNBLOCKED = 2048
GPU_MAX_BLOCK = 128


def tpu_block(num_logical_pages: int) -> int:
    """Logical pages per TPU step: a multiple of 128 lanes dividing the page count, or all of them when few."""
    for block in TPU_BLOCKS:
        if num_logical_pages % block == 0:
            return block
    if num_logical_pages <= TPU_MAX_UNBLOCKED:
        return num_logical_pages
    raise InputError(
        f"TPU page selection: {num_logical_pages} logical pages is neither a multiple of 128 nor at most "
        f"{TPU_MAX_UNBLOCKED}; round the cache capacity up (SparsityConfig.capacity_multiple)"
    )


def gpu_block(num_logical_pages: int) -> int:
    """Logical pages per GPU program: the largest power of two <= 128 dividing the page count (at least 16)."""
    block = GPU_MAX_BLOCK
    while block >= 16:
        if num_logical_pages % block == 0:
            return block
        block //= 2
    raise InputError(
        f"GPU page selection: {num_logical_pages} logical pages is not a multiple of 16; round the cache capacity "
        "up (SparsityConfig.capacity_multiple)"
    )


def logical_page_scores(
    q: jax.Array,
    k_min: jax.Array,
    k_max: jax.Array,
    page_valid: jax.Array,
    *,
    impl: str = "tpu",
    interpret: bool = False,
) -> jax.Array:
    """Scores ``[B, K, logical_pages]`` float32 of ``q [B, K, G, H]`` against key minima / maxima
    ``[B, K, logical_pages, H]``.

    ``page_valid [B, logical_pages]`` bool: False on logical pages with no visible token (their score is ``-inf``).
    """
    if impl not in IMPLEMENTATIONS:
        raise InputError(f"impl={impl!r}: expected one of {IMPLEMENTATIONS}")
    if q.ndim != 4 or k_min.shape != k_max.shape or k_min.ndim != 4:
        raise InputError(
            f"page scores want q [B, K, G, H] and k_min/k_max [B, K, logical_pages, H]; got {q.shape}, {k_min.shape}"
        )
    B, K, G, H = q.shape
    logical_pages = k_min.shape[2]
    if k_min.shape[:2] != (B, K) or k_min.shape[3] != H or page_valid.shape != (B, logical_pages):
        raise InputError(
            f"q {q.shape}, k_min {k_min.shape} and page_valid {page_valid.shape} disagree "
            "(want page_valid [B, logical_pages])"
        )
    if impl == "reference":
        return page_select_reference.logical_page_scores(q, k_min, k_max, page_valid.astype(bool))
    valid = jnp.where(page_valid.astype(bool), 0, -1).astype(jnp.int32)
    if impl == "tpu":
        out = page_select_tpu.forward(
            pad_axis(q, 2, -(-G // 8) * 8),
            k_min,
            k_max,
            valid[:, None],
            groups=G,
            block=tpu_block(logical_pages),
            interpret=interpret,
        )
        return out[:, :, 0]
    if H & (H - 1) or H < 16:
        raise InputError(f"GPU page selection: head dim {H} must be a power of two >= 16")
    return page_select_gpu.forward(
        pad_axis(q, 2, triton_dot_size(G)),
        k_min,
        k_max,
        valid,
        groups=G,
        block=gpu_block(logical_pages),
        interpret=interpret,
    )
