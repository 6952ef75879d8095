"""What a question returns, from a video, a memory or a live stream (docs/videoqa.md)."""

from __future__ import annotations

import dataclasses

import numpy as np

from qv_jax.pipeline.executor import Timings

__all__ = ["Answer"]


@dataclasses.dataclass(frozen=True)
class Answer:
    """An answer: its ``text`` (special tokens left out), the generated ``token_ids`` (a final stop token
    included), ``timings`` of every stage, and ``kv_bytes``, the keys and values the cache held at the end
    (pruned video memory + question + answer, all layers). A live stream's answer also has ``stream_time_s``, the
    stream time of the newest frame its memory held (``None`` otherwise)."""

    text: str
    token_ids: np.ndarray
    timings: Timings
    kv_bytes: int
    stream_time_s: float | None = None
