"""Test videos made the way users' files are made: by the ``ffmpeg`` command line, from one numbered clip.

The clip (``make_sample_video``: frame i shows the number i) is re-encoded or remuxed by ``ffmpeg`` in each style
below, so a test can check both that the parallel read equals the sequential reference and, by reading the
numbers back, that the reference itself shows the frames in the right order. ``ffmpeg`` is looked up on PATH;
tests that need it skip, with the reason, where it is missing.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from video_helpers import scratch

from qv_jax.testing.videos import make_sample_video

FFMPEG = shutil.which("ffmpeg")
FFMPEG_TIMEOUT_S = 120
SOURCE_FRAMES = 48
SOURCE_FPS = 24


@functools.cache
def has_encoder(name: str) -> bool:
    """Whether this ``ffmpeg`` build has the encoder ``name`` (Debian's has libx264, libx265, libvpx, libxvid)."""
    if FFMPEG is None:
        return False
    listing = subprocess.run(
        [FFMPEG, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=FFMPEG_TIMEOUT_S, check=True
    ).stdout
    return any(line.split()[1:2] == [name] for line in listing.splitlines() if line.startswith(" "))


def ffmpeg(*args: str | Path) -> None:
    """Run ``ffmpeg`` with ``args`` (quiet, overwriting), failing the test with its message if it fails."""
    command = [FFMPEG, "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=FFMPEG_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({result.returncode}): {' '.join(command)}\n{result.stderr}")


@functools.cache
def source(size: tuple[int, int] = (64, 96), frames: int = SOURCE_FRAMES) -> Path:
    """The numbered clip every case starts from: H.264 4:4:4, near lossless, so re-encoding keeps the numbers."""
    return make_sample_video(
        scratch(f"ffmpeg_source_{size[0]}x{size[1]}_{frames}.mkv"),
        num_frames=frames,
        fps=SOURCE_FPS,
        size=size,
        gop=frames,
        bframes=0,
        pix_fmt="yuv444p",
        crf=4,
    )


def _encode(options: str, source_path: Callable[[], Path] = lambda: source()) -> Callable[[Path], None]:
    return lambda path: ffmpeg("-i", source_path(), *options.split(), path)


# libx264 in 4:2:0, as cameras and phones write it, with 2 B-frames and a keyframe every 12 frames.
X264 = "-c:v libx264 -preset veryfast -pix_fmt yuv420p -bf 2 -g 12"


def _rotated(degrees: int) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        plain = path.with_name(f"{path.stem}_plain.mp4")
        ffmpeg("-i", source(), *X264.split(), plain)
        # How phones tag portrait video: a display matrix on a stored landscape stream (ffmpeg 5 writes it from
        # the rotate tag when copying).
        ffmpeg("-i", plain, "-c", "copy", "-metadata:s:v:0", f"rotate={degrees}", path)

    return build


def _concat(path: Path) -> None:
    """Three segments with different time bases joined without re-encoding, as screen-recording and camera
    splits are: the joined stream's pts collide or stop reordering after the joins."""
    segments = []
    for i, timescale in enumerate((24, 90000, 1000)):
        segment = path.with_name(f"{path.stem}_part{i}.mp4")
        ffmpeg("-i", source(), *X264.split(), "-video_track_timescale", str(timescale), segment)
        segments.append(segment)
    listing = path.with_name(f"{path.stem}_list.txt")
    listing.write_text("".join(f"file '{s}'\n" for s in segments))
    ffmpeg("-f", "concat", "-safe", "0", "-i", listing, "-c", "copy", path)


def _cut(path: Path) -> None:
    """``ffmpeg -ss T -i in -c copy``: starts at the keyframe before T, an edit list hides the frames up to T."""
    whole = path.with_name(f"{path.stem}_whole.mp4")
    ffmpeg("-i", source(), *X264.split(), whole)
    ffmpeg("-ss", "0.5", "-i", whole, "-c", "copy", path)


def _two_streams(path: Path) -> None:
    extra = "-f lavfi -i testsrc2=size=64x48:rate=24 -map 0:v -map 1:v -t 2"
    ffmpeg("-i", source(), *extra.split(), *X264.split(), path)


def _cover_art(path: Path) -> None:
    """A video whose first stream is an attached picture (cover art), as music-video rips and podcasts have."""
    cover = path.with_name(f"{path.stem}_cover.png")
    ffmpeg("-f", "lavfi", "-i", "color=red:size=32x32", "-frames:v", "1", cover)
    streams = "-map 0 -map 1 -c:v:0 png -disposition:v:0 attached_pic -c:v:1 libx264 -preset veryfast"
    ffmpeg("-i", cover, "-i", source(), *streams.split(), "-pix_fmt", "yuv420p", "-bf", "2", "-g", "12", path)


@functools.cache
def bars() -> Path:
    """Saturated colour bars (lossless 4:4:4), for the colour cases: a wrong matrix shows on them."""
    path = scratch("ffmpeg_bars.mkv")
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "smptehdbars=size=192x128:rate=24",
        "-frames:v",
        "14",
        *"-c:v ffv1 -pix_fmt yuv444p".split(),
        path,
    )
    return path


@dataclass(frozen=True)
class Case:
    """One file of the matrix: its name, how ffmpeg makes it, the encoder it needs, and the frame numbers its
    frames show in display order (``None``: 0, 1, 2, ... up to the frame count; with ``tail``, the last of them,
    for cuts whose first frame depends on where the encoder put keyframes)."""

    filename: str
    build: Callable[[Path], None]
    encoder: str = "libx264"
    numbers: tuple[int, ...] | None = None
    slow: bool = False
    tail: bool = False

    def expected(self, count: int) -> list[int]:
        numbers = list(self.numbers or range(count))
        return numbers[len(numbers) - count :] if self.tail else numbers


# The encodings of the colour cases: 10-bit 4:2:0 (phones, screen recorders), tagged matrices and ranges, and
# odd-sized 4:2:0 (VP9 / MJPEG at odd sizes).
COLOUR = {
    "h264_high10": ("h264_high10.mp4", X264.replace("yuv420p", "yuv420p10le") + " -profile:v high10", "libx264"),
    "hevc_main10_hdr": (
        "hevc_main10_hdr.mkv",
        "-c:v libx265 -preset ultrafast -x265-params log-level=error:keyint=12:bframes=2:crf=8 -pix_fmt yuv420p10le "
        "-color_primaries bt2020 -color_trc smpte2084 -colorspace bt2020nc",
        "libx265",
    ),
    "h264_bt709_tagged": (
        "h264_bt709.mp4",
        X264 + " -colorspace bt709 -color_primaries bt709 -color_trc bt709",
        "libx264",
    ),
    "h264_full_range_tagged": ("h264_full_range.mp4", X264 + " -color_range pc", "libx264"),
    "vp9_odd_420": (
        "vp9_odd.webm",
        "-vf scale=97:65 -pix_fmt yuv420p -c:v libvpx-vp9 -g 12 -deadline realtime",
        "libvpx-vp9",
    ),
    "mjpeg_odd_full_range": ("mjpeg_odd.avi", "-vf scale=97:65 -c:v mjpeg -pix_fmt yuvj420p -q:v 3", "mjpeg"),
}

CASES = {
    # 1. colour, on the numbered clip (the colour test makes the same encodings of colour bars)
    **{
        name: Case(filename, _encode(options), encoder=encoder) for name, (filename, options, encoder) in COLOUR.items()
    },
    "vp9_1281x721": Case(
        "vp9_1281x721.webm",
        _encode("-vf scale=1281:721 -frames:v 12 -pix_fmt yuv420p -c:v libvpx-vp9 -deadline realtime"),
        encoder="libvpx-vp9",
        numbers=tuple(range(12)),
        slow=True,
    ),
    "h264_444_1281x721": Case(
        "h264_444_1281x721.mp4",
        _encode("-vf scale=1281:721 -frames:v 12 " + X264.replace("yuv420p", "yuv444p")),
        numbers=tuple(range(12)),
    ),
    # 2. rotation
    "rotate_90": Case("rotate_90.mp4", _rotated(90)),
    "rotate_270": Case("rotate_270.mp4", _rotated(270)),
    # 3. damaged timestamps
    "concat_mp4": Case("concat.mp4", _concat, numbers=tuple(range(SOURCE_FRAMES)) * 3),
    "concat_mkv": Case(
        "concat.mkv",
        lambda path: ffmpeg("-i", _built("concat_mp4"), "-c", "copy", path),
        numbers=tuple(range(SOURCE_FRAMES)) * 3,
    ),
    "concat_mkv_to_mp4": Case(
        "concat_remuxed.mp4",
        lambda path: ffmpeg("-i", _built("concat_mkv"), "-c", "copy", path),
        numbers=tuple(range(SOURCE_FRAMES)) * 3,
    ),
    "concat_mp4_cut": Case(
        "concat_cut.mp4",
        lambda path: ffmpeg("-ss", "4", "-i", _built("concat_mp4"), "-c", "copy", path),
        numbers=tuple(range(SOURCE_FRAMES)) * 3,
        tail=True,
    ),
    # 4. Xvid in AVI with B-frames and N-VOP placeholders
    "xvid_avi": Case("xvid.avi", _encode("-c:v libxvid -bf 2 -g 12 -q:v 3"), encoder="libxvid"),
    # 5. odd but valid
    "edit_list_cut": Case("cut.mp4", _cut, numbers=tuple(range(12, SOURCE_FRAMES))),
    "open_gop_8_bframes": Case(
        "open_gop.mp4",
        _encode(X264.replace("-bf 2 -g 12", "-bf 8 -x264-params keyint=16:min-keyint=16:scenecut=0:open-gop=1")),
    ),
    "fragmented_mp4": Case("fragmented.mp4", _encode(X264 + " -movflags frag_keyframe+empty_moov+default_base_moof")),
    "mpeg2_ps": Case("mpeg2.mpg", _encode("-c:v mpeg2video -bf 2 -g 12 -q:v 3 -f vob"), encoder="mpeg2video"),
    "vp8_altref": Case(
        "vp8.webm", _encode("-c:v libvpx -auto-alt-ref 1 -lag-in-frames 16 -g 24 -b:v 300k"), encoder="libvpx"
    ),
    "interlaced_h264": Case("interlaced.ts", _encode("-flags +ildct+ilme " + X264 + " -x264-params tff=1")),
    "two_video_streams": Case("two_streams.mkv", _two_streams),
    "cover_art_first": Case("cover_art.mp4", _cover_art),
    "animated_gif": Case("animated.gif", _encode("-frames:v 24"), encoder="gif", numbers=tuple(range(24))),
}


def colour_bars_video(name: str) -> Path:
    """Colour case ``name``'s encoding applied to :func:`bars`."""
    filename, options, _ = COLOUR[name]
    path = scratch(f"ffmpeg_bars_{filename}")
    if not path.exists():
        _encode(options, bars)(path)
    return path


@functools.cache
def _built(name: str) -> Path:
    case = CASES[name]
    path = scratch(f"ffmpeg_{case.filename}")
    case.build(path)
    return path


def ffmpeg_video(name: str) -> Path:
    """The matrix file ``name``, made once per test session; raises for a missing ffmpeg or encoder so callers
    can skip with the reason (see :func:`missing`)."""
    return _built(name)


def missing(name: str) -> str | None:
    """Why case ``name`` cannot be made here, or ``None``."""
    if FFMPEG is None:
        return "the ffmpeg command line is not installed (apt-get install ffmpeg)"
    if not has_encoder(CASES[name].encoder):
        return f"this ffmpeg has no {CASES[name].encoder} encoder"
    return None
