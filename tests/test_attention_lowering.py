"""The block-sparse kernels lower for TPU (Mosaic) and CUDA (Triton) from this CPU-only machine.

Lowering runs the Pallas -> Mosaic / Triton IR translation (block shapes, memory spaces, unsupported ops) without
hardware, at the production tile sizes and the shapes of Qwen2.5-VL-7B: the text decoder (28 query heads, 4 KV
heads, head dim 128, DuoAttention-style half streaming heads) and the vision tower (16 heads, head dim 80,
non-causal window attention through segment ids). Forward and backward (jax.grad) are both lowered.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qv_jax.attention import HeadPattern, block_tables, sparse_attention
from qv_jax.kernels.block_sparse_tpu import flatten_steps

PLATFORMS = {"tpu": ("tpu", "tpu_custom_call"), "cuda": ("gpu", "triton")}
TEXT_PATTERNS = (HeadPattern.dense(), HeadPattern.streaming(sink=128, local=256)) * 2
LONGGEN_PATTERNS = tuple(HeadPattern.strided(local_blocks=4, vert_stride=4, offset=h) for h in range(4))

# name: (Hq, Hkv, T, S, D, patterns, causal, with segment ids)
SHAPES = {
    "qwen7b_text_prefill": (28, 4, 8192, 8192, 128, TEXT_PATTERNS, True, False),
    "qwen7b_chunked_prefill": (28, 4, 1024, 8192, 128, TEXT_PATTERNS, True, False),
    "qwen7b_longgen_strided": (28, 4, 4096, 4096, 128, LONGGEN_PATTERNS, True, False),
    "qwen7b_packed_prompts": (28, 4, 2048, 2048, 128, HeadPattern.dense(), True, True),
    "qwen7b_vision_windows": (16, 16, 4096, 4096, 80, HeadPattern.dense(), False, True),
}


def lowered_text(platform, name, grad):
    Hq, Hkv, T, S, D, patterns, causal, with_segments = SHAPES[name]
    kernel, _ = PLATFORMS[platform]

    def attend(q, k, v, seg):
        return sparse_attention(
            q, k, v, patterns, segment_ids=seg if with_segments else None, causal=causal, backend="pallas",
            kernel=kernel,
        )  # fmt: skip

    def fn(q, k, v, seg):
        if not grad:
            return attend(q, k, v, seg)
        return jax.grad(lambda *a: attend(*a, seg).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    args = (
        jax.ShapeDtypeStruct((1, Hq, T, D), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, Hkv, S, D), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, Hkv, S, D), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, S), jnp.int32),
    )
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_kernels_lower_at_production_shapes(platform, name, grad):
    text = lowered_text(platform, name, grad)
    marker = PLATFORMS[platform][1]
    # forward: one kernel; backward: the forward again (residuals) plus the dq and dk/dv kernels
    assert len(re.findall(rf"custom_call @\S*{marker}", text)) == (3 if grad else 1)


def test_lowered_tpu_forward_has_one_grid_step_per_visited_tile():
    """The TPU grid is (batch, steps): a streaming head adds only its own tiles, not the dense row length."""
    tables = block_tables(TEXT_PATTERNS, 8192, 8192, num_kv_heads=4)
    steps = flatten_steps(tables.kv_count, tables.kv_block, tables.kv_mask, 4)
    assert steps.shape[1] == int(np.sum(tables.visited_per_head()))
