"""Live video (VideoScan-style streaming): a bounded memory of semantic carriers, asked at any time.

See docs/streaming.md. ``VideoStream`` is made by :meth:`qv_jax.VideoQA.stream`.
"""

from __future__ import annotations

from qv_jax._lazy import lazy_exports

EXPORTS = {
    "StreamConfig": "qv_jax.streaming.stream",
    "VideoStream": "qv_jax.streaming.stream",
}

__all__ = list(EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
