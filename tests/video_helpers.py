"""Generated test videos and the sequential PyAV decode that parallel decoding must match bit for bit."""

from __future__ import annotations

import atexit
import functools
import glob
import os
import shutil
import tempfile
from pathlib import Path

import av
import numpy as np

from qv_jax.testing.videos import make_sample_video
from qv_jax.video import VideoReader
from qv_jax.video._worker import convert_frame
from qv_jax.video.buffer import SHM_DIR, buffer_prefix

os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole configuration otherwise; keep errors only

# Every input the decoder must handle exactly: file name and make_sample_video keywords. Tiny and short, so all
# of them together encode in a few seconds on two cores.
VIDEOS = {
    "h264_bframes": ("h264_bframes.mp4", dict(seconds=3, bframes=2, gop=12)),
    "h264_open_gop": ("h264_open_gop.mp4", dict(seconds=3, bframes=3, gop=12, open_gop=True)),
    "nonzero_start": ("nonzero_start.mp4", dict(seconds=2, start_time_s=3.25, gop=10)),
    "vfr_mkv": ("vfr.mkv", dict(seconds=3, vfr=True, gop=12)),
    "mpegts": ("mpegts.ts", dict(seconds=3, bframes=2, gop=12)),
    "mpegts_open_gop": ("mpegts_open_gop.ts", dict(seconds=3, bframes=3, gop=12, open_gop=True)),
    "hevc": ("hevc.mp4", dict(codec="hevc", seconds=2, bframes=3, gop=12, open_gop=True, size=(64, 96))),
    "hevc_10bit": ("hevc_10bit.mkv", dict(codec="hevc", seconds=2, gop=12, size=(64, 96), pix_fmt="yuv420p10le")),
    "vp9_webm": ("vp9.webm", dict(codec="vp9", seconds=3, gop=12, size=(48, 64))),
    "av1": ("av1.mp4", dict(codec="av1", seconds=2, gop=12, size=(64, 96))),
    "odd_size_h264": ("odd_h264.mp4", dict(seconds=2, gop=12, size=(53, 75), pix_fmt="yuv444p")),
    "odd_size_vp9": ("odd_vp9.webm", dict(codec="vp9", seconds=2, gop=12, size=(47, 65))),
    "single_frame": ("single.mp4", dict(num_frames=1)),
    "with_audio": ("audio.mkv", dict(seconds=2, gop=12, audio=True)),
}

_ROOT = Path(tempfile.mkdtemp(prefix="qv-jax-test-videos-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def _cut_mid_gop(name: str) -> Path:
    """H.264 in MP4 cut without re-encoding at a point inside a GOP, as ``ffmpeg -ss T -c copy`` does: the packets
    start at a keyframe, and an edit list hides the first frames, which the demuxer marks for discard."""
    source = video("h264_bframes")  # GOP 12: keyframes at frames 0, 12, 24, ...
    path = scratch(name)
    with av.open(str(source)) as inp, av.open(str(path), "w") as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        period = None
        started = False
        for packet in inp.demux(inp.streams.video[0]):
            if not packet.size:
                continue
            period = period or packet.duration
            if not started and not (packet.is_keyframe and packet.pts == 12 * period):
                continue
            started = True
            shift = 17 * period  # frames 12..16 end up before 0 and are hidden
            packet.pts, packet.dts = packet.pts - shift, packet.dts - shift
            packet.stream = stream
            out.mux(packet)
    return path


# Inputs made from another video rather than encoded.
DERIVED = {"mp4_cut_mid_gop": _cut_mid_gop}


@functools.cache
def video(name: str) -> Path:
    """The generated video ``name`` (see VIDEOS and DERIVED), made once per test session."""
    if name in DERIVED:
        return DERIVED[name](f"{name}.mp4")
    filename, options = VIDEOS[name]
    return make_sample_video(_ROOT / filename, **options)


@functools.cache
def long_video(frames: int = 1500, gop: int = 24) -> Path:
    """A longer H.264 video, for reads that must still be running when a test interferes with them."""
    return make_sample_video(_ROOT / f"long_{frames}_{gop}.mp4", num_frames=frames, size=(48, 64), gop=gop, bframes=2)


def scratch(name: str) -> Path:
    """A path in the session's scratch directory, for files a test makes itself."""
    return _ROOT / name


def remux(source: Path, name: str, *, rotation: int | None = None, faststart: bool = False) -> Path:
    """Copy ``source``'s video packets into a new file, optionally with a display rotation (counter-clockwise
    degrees) or, for MP4, its index before the data ("faststart", as streaming sites serve MP4)."""
    path = scratch(name)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(source)) as inp, av.open(str(path), "w", options=options) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for packet in inp.demux(inp.streams.video[0]):
            if packet.size:
                packet.stream = stream
                out.mux(packet)
    return path


def sequential_decode(
    path: Path, size: tuple[int, int] | None = None, interpolation: str = "bicubic", rotate: bool = True
) -> tuple[list[int], np.ndarray]:
    """The reference: the video stream decoded front to back in one pass with PyAV, every frame the decoder
    outputs, in its output order, converted as the workers do (same swscale call) and, when ``rotate``, turned
    as displayed. ``size`` is the output size after the turn.

    Returns the frames' pts in output order and the frames, uint8 [frames, height, width, 3].
    """
    reformatter = av.video.reformatter.VideoReformatter()
    pts, frames = [], []
    with av.open(str(path)) as container:
        stream = next(s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic)
        for frame in container.decode(stream):
            rotation = 90 * round(frame.rotation / 90) if rotate else 0
            sideways = rotation % 180 != 0
            height, width = size or ((frame.width, frame.height) if sideways else (frame.height, frame.width))
            out = np.empty((height, width, 3), np.uint8)
            convert_frame(reformatter, frame, height, width, interpolation, out, rotation)
            pts.append(frame.pts)
            frames.append(out)
    return pts, np.stack(frames)


def assert_full_read_exact(path: Path, workers: int = 2) -> None:
    """Read every frame of ``path`` with ``workers`` processes and check them against the sequential decode."""
    _, expected = sequential_decode(path)
    with VideoReader(path, workers=workers) as r:
        np.testing.assert_array_equal(r.read(indices=np.arange(len(expected))).frames, expected)


def buffer_files() -> list[str]:
    """This process's frame-buffer files still on disk, in /dev/shm or the temporary directory."""
    pattern = buffer_prefix() + "*"
    return glob.glob(os.path.join(SHM_DIR, pattern)) + glob.glob(os.path.join(tempfile.gettempdir(), pattern))
