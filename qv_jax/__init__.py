"""qv-jax: answer questions about long videos in real time with Qwen2.5-VL, in JAX / Flax NNX / Pallas.

Importing ``qv_jax`` is cheap and does not import JAX: decoder worker processes import ``qv_jax.video`` and
must stay free of it. The heavy entry points below are imported on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "VideoReader": "qv_jax.video",
    "VideoInfo": "qv_jax.video",
    "FramePlan": "qv_jax.video",
    "Frames": "qv_jax.video",
    "prefetch": "qv_jax.video",
    "load_model": "qv_jax.runtime",
    "VideoQA": "qv_jax.videoqa",
    "VideoMemory": "qv_jax.memory",
    "make_mesh": "qv_jax.sharding",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qv_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
