"""Synthetic sample videos whose pixels say which frame they are.

``make_sample_video`` encodes a video with PyAV in any codec / container / GOP layout the decoder must handle
(B-frames, open GOP, non-zero start time, variable frame rate, odd sizes). Every frame carries its frame number as
a 4×4 grid of bright / dark cells (bit b of the number in cell b, row-major) over a scrolling noise texture that
gives the encoder real work; ``frame_number`` reads it back, so a test sees which frame came back without
trusting any timestamp.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from qv_jax.errors import InputError

CODE_BITS = 16  # frame numbers up to 65535
_GRID = 4
_BRIGHT, _DARK, _TEXTURE_AMPLITUDE = 200, 48, 24

# Our codec names -> FFmpeg encoders, in order of preference.
_ENCODERS = {
    "h264": ("libx264",),
    "hevc": ("libx265",),
    "vp9": ("libvpx-vp9",),
    "av1": ("libsvtav1", "libaom-av1", "librav1e"),
    "mpeg4": ("mpeg4",),
}
# Frame-duration pattern of variable-frame-rate samples, in multiples of the nominal frame period.
_VFR_PATTERN = (1.0, 1.75, 0.5, 1.25, 0.75, 2.0, 1.0, 0.75)


def _encoder(codec: str) -> str:
    if codec not in _ENCODERS:
        raise InputError(f"unknown sample codec {codec!r}; choose from {', '.join(_ENCODERS)}")
    for name in _ENCODERS[codec]:
        try:
            av.codec.Codec(name, "w")
            return name
        except av.FFmpegError:
            continue
    raise InputError(f"no encoder for {codec!r} in this FFmpeg build (tried {', '.join(_ENCODERS[codec])})")


def _encoder_options(encoder: str, gop: int, bframes: int, open_gop: bool, crf: int | None, preset: str | None):
    if encoder == "libx264":
        params = f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}:open-gop={int(open_gop)}"
        return {"preset": preset or "ultrafast", "x264-params": params, "crf": str(crf or 23)}
    if encoder == "libx265":
        params = f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}:open-gop={int(open_gop)}:log-level=error"
        return {"preset": preset or "ultrafast", "x265-params": params, "crf": str(crf or 28)}
    if encoder == "libvpx-vp9":
        return {"g": str(gop), "keyint_min": str(gop), "deadline": "realtime", "cpu-used": "8", "crf": str(crf or 32)}
    if encoder == "libsvtav1":
        return {"g": str(gop), "preset": preset or "12", "crf": str(crf or 35), "svtav1-params": "lp=1"}
    if encoder == "libaom-av1":
        return {"g": str(gop), "cpu-used": "8", "crf": str(crf or 35)}
    return {"g": str(gop), "bf": str(bframes)}


def sample_frame(number: int, height: int, width: int, texture: np.ndarray | None = None) -> np.ndarray:
    """The RGB uint8 [height, width, 3] picture of frame ``number``: its code cells over a texture slice."""
    bits = (number >> np.arange(CODE_BITS)) & 1
    cells = np.where(bits.reshape(_GRID, _GRID) == 1, _BRIGHT, _DARK).astype(np.int16)
    rows = np.minimum(np.arange(height) * _GRID // height, _GRID - 1)
    cols = np.minimum(np.arange(width) * _GRID // width, _GRID - 1)
    luma = cells[rows[:, None], cols[None, :]]
    picture = np.repeat(luma[:, :, None], 3, axis=2)
    # A slow colour drift keeps chroma busy without touching the code's luma contrast.
    picture[:, :, 0] += (number * 3) % 32 - 16
    picture[:, :, 2] -= (number * 5) % 32 - 16
    if texture is not None:
        offset = (number * 4) % (texture.shape[1] - width + 1)
        picture += texture[:height, offset : offset + width, None]
    return np.clip(picture, 0, 255).astype(np.uint8)


def frame_number(frame: np.ndarray) -> int:
    """Read back the frame number drawn by :func:`sample_frame` from a decoded RGB frame [H, W, 3]."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise InputError(f"expected an RGB frame [H, W, 3], got shape {frame.shape}")
    height, width = frame.shape[:2]
    luma = frame.astype(np.float32).mean(axis=2)
    number = 0
    for bit in range(CODE_BITS):
        r, c = divmod(bit, _GRID)
        # The middle half of each cell: away from edges blurred by compression or resizing.
        top, bottom = (4 * r + 1) * height // (4 * _GRID), (4 * r + 3) * height // (4 * _GRID)
        left, right = (4 * c + 1) * width // (4 * _GRID), (4 * c + 3) * width // (4 * _GRID)
        cell = luma[top : max(bottom, top + 1), left : max(right, left + 1)]
        if cell.mean() > (_BRIGHT + _DARK) / 2:
            number |= 1 << bit
    return number


def _frame_times(count: int, fps: float, vfr: bool, start_time_s: float, time_base: Fraction) -> list[int]:
    period = 1.0 / fps
    times, t = [], start_time_s
    for i in range(count):
        times.append(round(t / time_base))
        t += period * (_VFR_PATTERN[i % len(_VFR_PATTERN)] if vfr else 1.0)
    return times


def make_sample_video(
    path: str | os.PathLike,
    *,
    seconds: float = 4.0,
    fps: float = 24.0,
    size: tuple[int, int] = (120, 160),
    codec: str = "h264",
    gop: int = 12,
    bframes: int = 2,
    open_gop: bool = False,
    start_time_s: float = 0.0,
    vfr: bool = False,
    pix_fmt: str = "yuv420p",
    crf: int | None = None,
    preset: str | None = None,
    texture: bool = True,
    audio: bool = False,
    num_frames: int | None = None,
    seed: int = 0,
) -> Path:
    """Encode a sample video at ``path`` (container chosen by its suffix) and return the path.

    ``size`` is (height, width). ``num_frames`` overrides ``seconds × fps``. ``gop`` is the keyframe interval in
    frames (fixed, no scene cuts), ``bframes`` the consecutive B-frames (H.264 / HEVC / MPEG-4), ``open_gop``
    lets B-frames before a keyframe reference the previous GOP (H.264 / HEVC). ``vfr`` varies frame durations
    with a fixed pattern (use a container with a fine time base: MKV, MP4). ``start_time_s`` shifts every
    timestamp. ``audio`` adds an AAC sine track. Frame i shows the number i (see :func:`frame_number`).
    """
    height, width = size
    count = round(seconds * fps) if num_frames is None else num_frames
    if count < 1 or height < 1 or width < 1 or fps <= 0 or gop < 1 or bframes < 0:
        raise InputError(f"invalid sample video: {count} frames of {height}x{width} at {fps} fps, gop {gop}")
    if count > 1 << CODE_BITS:
        raise InputError(f"sample videos hold at most {1 << CODE_BITS} frames, asked for {count}")
    encoder = _encoder(codec)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    noise = None
    if texture:
        # Blocky noise (8x8 cells) scrolled 4 px a frame: detail an encoder must motion-compensate, at a bitrate
        # closer to real footage than per-pixel noise.
        cells = rng.integers(
            -_TEXTURE_AMPLITUDE, _TEXTURE_AMPLITUDE + 1, size=(height // 8 + 1, (width + 256) // 8 + 1), dtype=np.int16
        )
        noise = np.repeat(np.repeat(cells, 8, axis=0), 8, axis=1)[:height, : width + 256]
    rate = Fraction(fps).limit_denominator(1001)
    time_base = Fraction(1, 1000) if vfr else 1 / rate
    times = _frame_times(count, fps, vfr, start_time_s, time_base)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(
            encoder, rate=rate, options=_encoder_options(encoder, gop, bframes, open_gop, crf, preset)
        )
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.time_base = time_base
        stream.time_base = time_base
        sound = None
        if audio:
            sound = container.add_stream("aac", rate=16000)
            sound.layout = "mono"
        audio_pts = 0
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(sample_frame(i, height, width, noise), format="rgb24")
            frame.pts, frame.time_base = times[i], time_base
            container.mux(stream.encode(frame))
            if sound is not None:
                # Enough audio to keep pace with the video, in AAC's 1024-sample frames.
                until = round((times[i] * time_base + 1 / fps - start_time_s) * 16000)
                while audio_pts < until:
                    t = (audio_pts + np.arange(1024)) / 16000
                    samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
                    chunk = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                    chunk.sample_rate, chunk.pts = 16000, audio_pts
                    container.mux(sound.encode(chunk))
                    audio_pts += 1024
        container.mux(stream.encode(None))
        if sound is not None:
            container.mux(sound.encode(None))
    return path
