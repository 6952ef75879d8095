"""Tiny random-weight Qwen2.5-VL / Qwen2-VL models with a toy tokenizer, for tests, the demo and benchmarks.

Nothing is downloaded and no torch is needed: :func:`tiny_config` is a few-hundred-kilobyte architecture,
:func:`random_model` draws its weights and trains a tokenizer for it, and :func:`write_hf_dir` saves one as a
Hugging Face model directory (hub naming), which the converter reads as it reads a download.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from qv_jax.model.config import ModelConfig, TextConfig, VisionConfig

__all__ = ["random_model", "tiny_config", "write_hf_dir"]


def tiny_config(variant: str = "qwen2_5_vl", *, vocab_size: int = 512, **token_ids: Any) -> ModelConfig:
    """A few-hundred-kilobyte random-weight model for demos and tests; special token ids at the vocab's end."""
    ids = {
        "bos_token_id": vocab_size - 9,
        "eos_token_ids": (vocab_size - 8,),
        "vision_start_token_id": vocab_size - 5,
        "vision_end_token_id": vocab_size - 4,
        "image_token_id": vocab_size - 3,
        "video_token_id": vocab_size - 2,
        "pad_token_id": vocab_size - 9,
    } | token_ids
    text = TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mrope_section=(2, 3, 3),
        max_position_embeddings=32768,
    )
    if variant == "qwen2_5_vl":
        vision = VisionConfig(
            variant=variant,
            depth=2,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            out_hidden_size=64,
            window_size=56,
            fullatt_block_indexes=(1,),
        )
    else:
        vision = VisionConfig(
            variant=variant,
            depth=2,
            hidden_size=32,
            num_heads=2,
            intermediate_size=128,
            out_hidden_size=64,
            fullatt_block_indexes=(),
            hidden_act="quick_gelu",
            tokens_per_second=1.0,
        )
    return ModelConfig(variant=variant, text=text, vision=vision, **ids)


def random_model(
    config: ModelConfig | None = None,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    seed: int = 0,
    dtype: str = "float32",
    **placement: Any,
):
    """A :class:`~qv_jax.runtime.VisionLanguageModel` of ``config`` (default :func:`tiny_config`) with random
    weights of ``seed`` and, when ``tokenizer_dir`` is given, a test tokenizer trained into it.

    ``placement`` takes the ``mesh`` and ``sparsity`` keywords of ``VisionLanguageModel.random``.
    """
    from qv_jax.runtime.vlm import VisionLanguageModel
    from qv_jax.testing.tokenizer import write_tokenizer

    config = tiny_config() if config is None else config
    tokenizer = None if tokenizer_dir is None else write_tokenizer(tokenizer_dir, config)
    return VisionLanguageModel.random(config, dtype=dtype, seed=seed, tokenizer=tokenizer, **placement)


def write_hf_dir(out: str | os.PathLike, config: ModelConfig | None = None, *, seed: int = 0) -> Path:
    """A Hugging Face-format model directory holding ``config`` (default :func:`tiny_config`) with random weights
    of ``seed`` and a test tokenizer: ``config.json``, ``model.safetensors`` (hub naming), tokenizer files."""
    from flax import nnx
    from safetensors.numpy import save_file

    from qv_jax.converters.hf_config import config_to_hf
    from qv_jax.converters.qwen2_5_vl import hf_name, map_key, to_hf_tensor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config() if config is None else config
    model = random_model(config, tokenizer_dir=out, seed=seed)
    tensors = {}
    for path, variable in nnx.to_flat_state(model.state):
        name = hf_name(tuple(path))
        _, layout = map_key(name)
        tensors[name] = np.ascontiguousarray(to_hf_tensor(layout, np.asarray(variable.get_value()), config))
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config_to_hf(config), indent=2))
    return out
