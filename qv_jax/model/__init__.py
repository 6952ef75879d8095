"""Flax NNX reimplementation of Qwen2.5-VL and Qwen2-VL (frames -> visual tokens, and the text decoder).

- :mod:`~qv_jax.model.config` — frozen configs and presets; :mod:`~qv_jax.model.qwen2_5_vl` — the modeling file;
- :mod:`~qv_jax.model.preprocess` / :mod:`~qv_jax.model.vision_layout` — on-device patchify, window layout;
- :mod:`~qv_jax.model.rope_index` — M-RoPE positions (docs/positions.md); :mod:`~qv_jax.model.tokenizer` — the
  tokenizer and the chat prompt; :mod:`~qv_jax.model.checkpoint` — qv-jax's checkpoint format.

``config``, ``rope_index`` and ``tokenizer`` are free of JAX.
"""

from __future__ import annotations

from qv_jax._lazy import lazy_exports

EXPORTS = {
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

__all__ = list(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
