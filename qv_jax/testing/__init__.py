"""Fixtures for tests, the demo, benchmarks and notebooks: tiny random models, a toy tokenizer, numbered videos.

The library itself never imports this package (``qv_jax.video.make_sample_video`` / ``frame_number`` forward here
for users who make sample clips). Like ``gemma.gm.testing``: real code paths, fake weights.
"""

from __future__ import annotations

from qv_jax._lazy import lazy_exports

EXPORTS = {
    "build_test_tokenizer": "qv_jax.testing.tokenizer",
    "special_ids_from_config": "qv_jax.testing.tokenizer",
    "write_tokenizer": "qv_jax.testing.tokenizer",
    "random_model": "qv_jax.testing.models",
    "tiny_config": "qv_jax.testing.models",
    "write_hf_dir": "qv_jax.testing.models",
    "frame_number": "qv_jax.testing.videos",
    "make_sample_video": "qv_jax.testing.videos",
}

__all__ = list(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
