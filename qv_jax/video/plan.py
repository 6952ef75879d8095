"""FramePlan: which frames a read returns and at what size, known before any pixel is decoded.

The model side computes token counts and multimodal positions from a plan while the decoder is still working,
so a plan carries everything that depends on the video's timing and nothing that depends on its pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qv_jax.errors import InputError
from qv_jax.video import sampling
from qv_jax.video.probe import FrameTable, VideoInfo

INTERPOLATIONS = ("bicubic", "bilinear", "area", "lanczos", "point")


@dataclass(frozen=True, eq=False)
class FramePlan:
    """The frames of one read, in the order they are returned.

    ``indices`` are presentation-order frame indices (int64 [N]), ``times_s`` their timestamps in seconds (pts ×
    time base, so they include the stream's start time), ``height`` × ``width`` the output size of every frame,
    ``sample_fps`` the rate qwen-vl-utils reports for the sample (N / ``frame_count`` × the video's average fps),
    ``frame_count`` the frames in the video it was made for, ``rotation`` the counter-clockwise degrees each frame
    is turned by (the display matrix's, or 0 for the stored frames); sizes are after the turn.
    """

    indices: np.ndarray
    times_s: np.ndarray
    height: int
    width: int
    sample_fps: float
    frame_count: int
    interpolation: str = "bicubic"
    rotation: int = 0

    @property
    def num_frames(self) -> int:
        return int(self.indices.size)

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def second_per_grid_t(self) -> float:
        """Seconds covered by one temporal patch of two frames, as Qwen2.5-VL's M-RoPE uses it."""
        return sampling.FRAME_FACTOR / self.sample_fps

    def __len__(self) -> int:
        return self.num_frames


def _as_indices(indices: Sequence[int] | np.ndarray, frame_count: int, path: str) -> np.ndarray:
    array = np.asarray(indices)
    if array.ndim != 1 or array.size == 0:
        raise InputError(f"indices for {path} must be a non-empty 1-D sequence, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        if not (np.issubdtype(array.dtype, np.floating) and np.all(array == np.round(array))):
            raise InputError(f"indices for {path} must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64)
    bad = array[(array < 0) | (array >= frame_count)]
    if bad.size:
        raise InputError(f"frame index {int(bad[0])} is out of range for {path}, which has {frame_count} frames")
    return array


def _parse_size(size: Sequence[int], path: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InputError(f"size must be (height, width), got {size!r}") from None
    if height < 1 or width < 1:
        raise InputError(f"size for {path} must be positive, got {height}x{width}")
    return height, width


def make_plan(
    info: VideoInfo,
    table: FrameTable,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    fps: float | None = None,
    num_frames: int | None = None,
    size: Sequence[int] | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: float | None = None,
    min_frames: int = sampling.FPS_MIN_FRAMES,
    max_frames: int | None = None,
    interpolation: str = "bicubic",
    rotate: bool = True,
) -> FramePlan:
    """Turn a request into a plan (see :meth:`VideoReader.plan` for the keywords); sizes follow the displayed
    orientation when ``rotate``, else the stored one."""
    path = info.path
    chosen = [name for name, v in (("indices", indices), ("fps", fps), ("num_frames", num_frames)) if v is not None]
    if len(chosen) > 1:
        raise InputError(f"give one of indices=, fps= or num_frames=, not {' and '.join(chosen)}")
    if size is not None and (min_pixels, max_pixels, total_pixels) != (None, None, None):
        raise InputError("give either size= or pixel bounds (min_pixels= / max_pixels= / total_pixels=), not both")
    if interpolation not in INTERPOLATIONS:
        raise InputError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    total = info.frame_count
    if indices is not None:
        chosen_indices = _as_indices(indices, total, path)
    elif total == 1:
        # Qwen needs an even frame count; like qwen-vl-utils pads an image list, a one-frame video repeats it.
        chosen_indices = np.zeros(sampling.FRAME_FACTOR, np.int64)
    else:
        n = sampling.smart_nframes(
            total, info.avg_fps, fps=fps, num_frames=num_frames, min_frames=min_frames, max_frames=max_frames
        )
        chosen_indices = sampling.sample_indices(total, n)
    n = chosen_indices.size
    native_h, native_w = (info.height, info.width) if rotate else (info.stored_height, info.stored_width)
    if size is not None:
        height, width = _parse_size(size, path)
    elif (min_pixels, max_pixels, total_pixels) != (None, None, None):
        low, high = sampling.video_pixel_bounds(
            n, min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels
        )
        height, width = sampling.smart_resize(native_h, native_w, min_pixels=low, max_pixels=high)
    else:
        height, width = native_h, native_w
    if max(height, width) > sampling.MAX_SIDE:
        how = "native size" if (height, width) == (native_h, native_w) else "size"
        raise InputError(
            f"{how} {height}x{width} for {path} exceeds the limit of {sampling.MAX_SIDE} pixels per side; ask for a "
            "smaller size= (--size) or max_pixels= (--max-pixels)"
        )
    chosen_indices.flags.writeable = False
    times = table.pts[chosen_indices] * table.time_base.numerator / table.time_base.denominator
    times.flags.writeable = False
    return FramePlan(
        indices=chosen_indices,
        times_s=times,
        height=height,
        width=width,
        sample_fps=sampling.sample_fps(n, total, info.avg_fps),
        frame_count=total,
        interpolation=interpolation,
        rotation=info.rotation if rotate else 0,
    )
