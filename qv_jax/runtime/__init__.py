"""Running a model (KV memory -> answer): jitted prefill and decode steps, generation, and :func:`load_model`.

- :mod:`~qv_jax.runtime.encode` — vision encoding and token embedding (frames split over ``"data"`` on a mesh);
- :mod:`~qv_jax.runtime.steps` — the decoder over a chunk through any KV handler, and the jitted step factory;
- :mod:`~qv_jax.runtime.dense` / :mod:`~qv_jax.runtime.sparse` — those steps over the dense and the sparse cache;
- :mod:`~qv_jax.runtime.sampling` / :mod:`~qv_jax.runtime.generate` — token choice, and the tail every answer
  shares;
- :mod:`~qv_jax.runtime.vlm` — :class:`VisionLanguageModel` (``forward`` / ``generate``) and :func:`load_model`.
"""

from __future__ import annotations

from qv_jax._lazy import lazy_exports

EXPORTS = {
    "DecodeRequest": "qv_jax.runtime.generate",
    "SamplingParams": "qv_jax.runtime.sampling",
    "GenerationOutput": "qv_jax.runtime.vlm",
    "VisionLanguageModel": "qv_jax.runtime.vlm",
    "load_model": "qv_jax.runtime.vlm",
}

__all__ = list(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
