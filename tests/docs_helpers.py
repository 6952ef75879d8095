"""Fixtures the docs and notebook tests share: a tiny Hugging Face-format model directory (no torch) and videos.

The user guide and the Colab quickstart start from a Hugging Face snapshot of Qwen2.5-VL (``config.json``,
``*.safetensors`` in hub naming, ``tokenizer.json``). :func:`write_hf_dir` writes one for a random tiny model by
running the converter's key map backwards, so ``qv-jax convert``, ``load_model`` and ``VideoQA.from_pretrained``
read it exactly as they would read a download.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from qv_jax.converters.qwen2_5_vl import hf_name, map_key
from qv_jax.model.config import ModelConfig
from qv_jax.model.tokenizer import build_test_tokenizer, special_ids_from_config
from qv_jax.runtime import VisionLanguageModel

CONFIG = ModelConfig.tiny()


def _to_hf(kind: str, value: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Our layout of one parameter back to the HF tensor (the inverse of ``convert_tensor``)."""
    if kind == "same":
        return value
    if kind == "linear":  # ours [in, *out_split] -> torch [out, in]
        return value.reshape(value.shape[0], -1).T
    if kind == "linear_in":  # ours [*in_split, out] -> torch [out, in]
        return value.reshape(-1, value.shape[-1]).T
    if kind == "split":
        return value.reshape(-1)
    if kind == "conv":  # ours [C*t*p*p, E] -> Conv3d [E, C, t, p, p]
        v = config.vision
        return value.T.reshape(value.shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    raise ValueError(kind)


def write_hf_dir(out: Path, *, seed: int = 0) -> Path:
    """A Hugging Face-format Qwen2.5-VL directory holding ``ModelConfig.tiny()`` with random weights of ``seed``
    and a trained test tokenizer: ``config.json``, ``model.safetensors`` (hub naming), tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_test_tokenizer(
        out, CONFIG.text.vocab_size, special_ids=special_ids_from_config(CONFIG.to_hf_config())
    )
    model = VisionLanguageModel.random(CONFIG, seed=seed, tokenizer=tokenizer)
    tensors = {}
    for path, variable in nnx.to_flat_state(model.state):
        name = hf_name(tuple(path))
        _, kind = map_key(name)
        tensors[name] = np.ascontiguousarray(_to_hf(kind, np.asarray(variable.get_value()), CONFIG))
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(CONFIG.to_hf_config(), indent=2))
    return out
