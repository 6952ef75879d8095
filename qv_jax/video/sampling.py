"""Qwen2.5-VL's video sampling rules, restated as small pure functions.

These decide which frames a video contributes and at what size, exactly as ``qwen-vl-utils`` (0.0.14,
``vision_process.py``) does, so frames fed to the model match what it was trained on. The decoder uses them to
plan a read, and the model side reuses them to compute token counts and positions before any pixel exists.

No JAX and no PyAV here: only ``math`` and ``numpy``.
"""

from __future__ import annotations

import math

import numpy as np

from qv_jax.errors import InputError

FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
FRAME_FACTOR = 2  # frames per temporal patch: Qwen2.5-VL needs an even frame count
IMAGE_FACTOR = 28  # patch 14 × spatial merge 2
MAX_RATIO = 200
VIDEO_MIN_PIXELS = 128 * IMAGE_FACTOR * IMAGE_FACTOR
VIDEO_MAX_PIXELS = 768 * IMAGE_FACTOR * IMAGE_FACTOR
VIDEO_TOTAL_PIXELS = 128000 * IMAGE_FACTOR * IMAGE_FACTOR * 0.9  # qwen-vl-utils' default model budget (128K tokens)
# Not Qwen's: the decoder's largest output side. 8K (7680 x 4320) and DCI 8K (8192 x 4320) fit; beyond it swscale
# refuses, or one frame takes hundreds of MiB of shared memory. Larger videos are read at a smaller size.
MAX_SIDE = 8192


def round_by_factor(number: float, factor: int) -> int:
    """The multiple of ``factor`` closest to ``number`` (Python's round: halves go to even)."""
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_nframes(
    total_frames: int,
    video_fps: float,
    *,
    fps: float | None = None,
    num_frames: int | None = None,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int | None = None,
) -> int:
    """How many frames Qwen samples from a video of ``total_frames`` frames at ``video_fps``.

    With ``num_frames``: that count rounded to even. Otherwise ``total / video_fps × fps`` (fps defaults to 2),
    clamped to ``[min_frames, max_frames]`` (max defaults to ``min(768, total_frames)``) and to ``total_frames``,
    then floored to even. The result must lie in ``[2, total_frames]``.
    """
    if fps is not None and num_frames is not None:
        raise InputError("give either fps= or num_frames=, not both")
    if total_frames < 1:
        raise InputError(f"total_frames must be positive, got {total_frames}")
    if num_frames is not None:
        if num_frames < 1:
            raise InputError(f"num_frames must be positive, got {num_frames}")
        nframes = round_by_factor(num_frames, FRAME_FACTOR)
    else:
        fps = FPS if fps is None else fps
        if not 0 < fps < math.inf:
            raise InputError(f"fps must be positive and finite, got {fps}")
        if not video_fps > 0:
            raise InputError(f"video_fps must be positive, got {video_fps}")
        low = ceil_by_factor(min_frames, FRAME_FACTOR)
        high = floor_by_factor(min(FPS_MAX_FRAMES, total_frames) if max_frames is None else max_frames, FRAME_FACTOR)
        nframes = total_frames / video_fps * fps
        nframes = floor_by_factor(min(min(max(nframes, low), high), total_frames), FRAME_FACTOR)
    if not FRAME_FACTOR <= nframes <= total_frames:
        raise InputError(
            f"the sampled frame count must lie in [{FRAME_FACTOR}, {total_frames}] for a video of {total_frames} "
            f"frames, got {nframes}"
        )
    return nframes


def sample_indices(total_frames: int, nframes: int) -> np.ndarray:
    """``round(linspace(0, total_frames - 1, nframes))`` as qwen-vl-utils computes it with torch.

    torch's CPU ``linspace`` works in float32: ``step = (end - start) / (n - 1)`` rounded to float32, the first half
    is ``start + step·i`` and the second half ``end - step·(n - 1 - i)``, each a fused multiply-add (one rounding
    to float32) in the AVX2 / AVX-512 / ARM builds everyone runs; ``round`` then sends halves to even. Long videos
    get different indices from a float64 linspace, so we repeat torch's arithmetic: the product of a float32 step
    and an integer below 2**24 is exact in float64, and so is the sum for ``nframes <= total_frames`` (step >= 1),
    which makes the float64 result rounded once to float32 equal to the fused operation.
    """
    if not 1 <= nframes <= max(total_frames, 1):
        raise InputError(f"cannot sample {nframes} frames from a video of {total_frames} frames")
    if nframes == 1:
        return np.zeros(1, np.int64)
    start, end = np.float32(0), np.float32(total_frames - 1)
    step = np.float64((end - start) / np.float32(nframes - 1))
    i = np.arange(nframes, dtype=np.int64)
    first = (np.float64(start) + step * i).astype(np.float32)
    second = (np.float64(end) - step * (nframes - 1 - i)).astype(np.float32)
    return np.rint(np.where(i < nframes // 2, first, second)).astype(np.int64)


def sample_fps(nframes: int, total_frames: int, video_fps: float) -> float:
    """The frame rate qwen-vl-utils reports for the sampled frames: ``nframes / total_frames × video_fps``."""
    return nframes / max(total_frames, 1e-6) * video_fps


def video_pixel_bounds(
    nframes: int,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: float | None = None,
) -> tuple[int, float]:
    """The per-frame pixel range qwen-vl-utils allows a video of ``nframes`` sampled frames.

    ``min = min_pixels or 128·28²``; ``max = max(min(768·28², total_pixels / nframes × 2), int(1.05·min))``, further
    capped by a caller's ``max_pixels`` (a caller can lower the budget, not raise it).
    """
    low = VIDEO_MIN_PIXELS if min_pixels is None else min_pixels
    total = VIDEO_TOTAL_PIXELS if total_pixels is None else total_pixels
    if low <= 0 or total <= 0 or (max_pixels is not None and max_pixels <= 0):
        raise InputError(f"pixel bounds must be positive: {min_pixels=}, {max_pixels=}, {total_pixels=}")
    high = max(min(VIDEO_MAX_PIXELS, total / nframes * FRAME_FACTOR), int(low * 1.05))
    if max_pixels is not None:
        high = min(max_pixels, high)
    return low, high


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = IMAGE_FACTOR,
    min_pixels: float = VIDEO_MIN_PIXELS,
    max_pixels: float = VIDEO_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen's output size: both sides multiples of ``factor``, area within ``[min_pixels, max_pixels]``, aspect
    ratio kept as closely as possible. Tiny frames are scaled up to the minimum area."""
    if height <= 0 or width <= 0:
        raise InputError(f"frame size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise InputError(f"aspect ratio of a {height}x{width} frame exceeds {MAX_RATIO}")
    if max_pixels < min_pixels:
        raise InputError(f"max_pixels ({max_pixels}) is below min_pixels ({min_pixels})")
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, floor_by_factor(height / beta, factor))
        w_bar = max(factor, floor_by_factor(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    return h_bar, w_bar
