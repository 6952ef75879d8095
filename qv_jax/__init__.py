"""qv-jax: answer questions about long videos in real time with Qwen2.5-VL, in JAX / Flax NNX / Pallas.

Importing ``qv_jax`` is cheap and does not import JAX: decoder worker processes import ``qv_jax.video`` and must
stay free of it. The entry points below are imported on first use. Layout: docs/architecture.md.
"""

from __future__ import annotations

from qv_jax._lazy import lazy_exports

__version__ = "0.1.0"

EXPORTS = {
    "VideoReader": "qv_jax.video.reader",
    "VideoInfo": "qv_jax.video.probe",
    "FramePlan": "qv_jax.video.plan",
    "Frames": "qv_jax.video.reader",
    "prefetch": "qv_jax.video.prefetcher",
    "load_model": "qv_jax.runtime.vlm",
    "VideoQA": "qv_jax.videoqa",
    "VideoQAConfig": "qv_jax.videoqa",
    "VideoMemory": "qv_jax.memory",
    "make_mesh": "qv_jax.sharding.mesh",
}

__all__ = ["__version__", *EXPORTS]
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
