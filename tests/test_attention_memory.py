"""No step of the model materialises ``[T, S]`` logits: the 7B-shaped steps lowered for TPU and CUDA with the
Pallas kernels hold no tensor of that shape (the jnp reference holds many), and the chunked path's compiled
temporary memory grows linearly with the sizes where the reference's grows with their product."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from benchmarks import lowering
from qv_jax.attention.backends import AttentionConfig
from qv_jax.testing import tiny_config


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["pallas", "jax"])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_7b_steps_lower_with_no_tokens_by_slots_tensor(platform, attention, tmp_path):
    # two of the 28 layers: every layer has the same shapes, and lowering all of them costs a minute per platform
    records = lowering.main(["--platform", platform, "--attention", attention, "--layers", "2", "--hlo-dir",
                             str(tmp_path), "--out", str(tmp_path / "lowering.json")])  # fmt: skip
    by_step = {r["step"]: r for r in records}
    assert all(r["lowered"] for r in records), records
    assert by_step["group"]["slots_S"] == 65536 and by_step["prefill"]["tokens_T"] == 1664
    assert by_step["prefill"]["tensors_with_T_and_S"] == 0 and by_step["group"]["tensors_with_T_and_S"] == 0
    assert (tmp_path / f"{platform}-group.mlir").stat().st_size > 0


def test_the_counter_finds_the_reference_logits():
    """The same count on the jnp reference, lowered at a small size, finds its ``[T, S]`` logits and masks."""
    records = lowering.lower_steps(tiny_config(), "tpu", backend="reference", tokens=384, memory=1280)
    assert all(r["tensors_with_T_and_S"] > 0 for r in records if r["step"] != "decode")
    assert lowering.tensors_with("tensor<2x384x1280xf32> tensor<384x384xbf16> tensor<384xi32>", 384, 1280) == 1
    assert lowering.tensors_with("tensor<2x384x1280xf32> tensor<384x384xbf16>", 384, 384) == 1


def _temp_bytes(backend: str, step: str, tokens: int, memory: int) -> int:
    fn, args, _, _ = lowering.steps(
        tiny_config(), AttentionConfig(backend), tokens=tokens, memory=memory, dtype=jnp.float32
    )[step]
    graphdef, *rest = args
    compiled = jax.jit(fn, static_argnums=0).trace(graphdef, *rest).lower().compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_chunked_temporary_memory_grows_linearly():
    # a group step of 256 tokens over a memory 4x larger: the chunked path adds only what the memory reads need
    group = {
        b: _temp_bytes(b, "group", 256, 4096) / _temp_bytes(b, "group", 256, 1024) for b in ("chunked", "reference")
    }
    assert group["chunked"] < 2 < 3 < group["reference"], group
    # a prompt prefill twice as long (T and S both double): linear against quadratic
    prompt = {
        b: _temp_bytes(b, "prefill", 1024, 1024) / _temp_bytes(b, "prefill", 512, 512) for b in ("chunked", "reference")
    }
    assert prompt["chunked"] < 2.2 and prompt["reference"] > 3.5, prompt
