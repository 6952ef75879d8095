"""QuickDecoder: exact, parallel, keyframe-aligned video decoding into shared memory.

``VideoReader`` probes a file, plans reads with Qwen2.5-VL's sampling rules (:mod:`qv_jax.video.sampling`) and
decodes them on a persistent pool of worker processes; ``prefetch`` moves streamed groups to the accelerator
ahead of use; ``qv_jax.video.samples`` makes synthetic test videos.

No JAX import here except inside ``prefetch``: decoder worker processes import this package.
"""

from qv_jax.video.plan import FramePlan
from qv_jax.video.prefetch import prefetch
from qv_jax.video.probe import VideoInfo
from qv_jax.video.reader import DecodeStats, Frames, VideoReader
from qv_jax.video.samples import frame_number, make_sample_video

__all__ = [
    "DecodeStats",
    "FramePlan",
    "Frames",
    "VideoInfo",
    "VideoReader",
    "frame_number",
    "make_sample_video",
    "prefetch",
]
