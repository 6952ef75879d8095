"""QuickDecoder: exact, parallel, keyframe-aligned video decoding into shared memory (video -> frames).

``VideoReader`` probes a file, plans reads with Qwen2.5-VL's sampling rules (:mod:`qv_jax.video.sampling`) and
decodes them on a persistent pool of worker processes; ``prefetch`` moves streamed groups to the accelerator ahead
of use. No JAX here except inside ``prefetch``: decoder processes import this package. See docs/video.md.
"""

from __future__ import annotations

from qv_jax._lazy import lazy_exports

EXPORTS = {
    "DecodeStats": "qv_jax.video.reader",
    "FramePlan": "qv_jax.video.plan",
    "Frames": "qv_jax.video.reader",
    "VideoInfo": "qv_jax.video.probe",
    "VideoReader": "qv_jax.video.reader",
    "prefetch": "qv_jax.video.prefetcher",
    # sample clips are a test fixture (qv_jax.testing); kept here for users who make them
    "frame_number": "qv_jax.testing.videos",
    "make_sample_video": "qv_jax.testing.videos",
}

__all__ = list(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
