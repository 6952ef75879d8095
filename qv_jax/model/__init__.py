"""Flax NNX reimplementation of Qwen2.5-VL and Qwen2-VL.

Submodules are imported on first use: ``config``, ``rope_index`` and ``tokenizer`` are free of JAX, and importing
one of them must not pull in the modeling code.
"""

from __future__ import annotations

import importlib

# public name -> submodule that defines it
_LAZY = {
    "ModelConfig": "qv_jax.model.config",
    "TextConfig": "qv_jax.model.config",
    "VisionConfig": "qv_jax.model.config",
    "QwenVL": "qv_jax.model.qwen2_5_vl",
    "DecoderLayer": "qv_jax.model.qwen2_5_vl",
    "KVHandler": "qv_jax.model.qwen2_5_vl",
    "ChunkAttention": "qv_jax.model.qwen2_5_vl",
    "abstract_model": "qv_jax.model.qwen2_5_vl",
    "patchify": "qv_jax.model.preprocess",
    "load_checkpoint": "qv_jax.model.checkpoint",
    "save_checkpoint": "qv_jax.model.checkpoint",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qv_jax.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
