"""Files made by the ffmpeg command line read exactly: every frame equals the sequential reference.

The reference (``sequential_decode``) is every frame a front-to-back PyAV decode outputs, in its output order,
converted by the workers' own call and turned as displayed; see docs/video.md for why. Each file also shows the
frame numbers of the clip it was made from, so the reference is checked too, and ffprobe's count of decoded
frames checks the probe's frame count.
"""

import json
import subprocess

import av
import numpy as np
import pytest
from ffmpeg_videos import CASES, COLOUR, FFMPEG_TIMEOUT_S, colour_bars_video, ffmpeg_video, missing
from video_helpers import buffer_files, sequential_decode

from qv_jax.video import VideoReader, frame_number
from qv_jax.video.probe import COLOR_SPACES


def _case(name: str):
    return pytest.param(name, marks=[pytest.mark.slow] if CASES[name].slow else [])


def _made(name: str):
    why = missing(name)
    if why:
        pytest.skip(why)
    return ffmpeg_video(name)


def _ffprobe_frames(path) -> int:
    """Frames ffprobe decodes from the stream QuickDecoder reads (the first that is not cover art)."""
    result = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-show_entries",
            "stream=index,nb_read_frames:disposition=attached_pic",
            "-select_streams",
            "v",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=FFMPEG_TIMEOUT_S,
        check=True,
    )
    streams = json.loads(result.stdout)["streams"]
    return int(next(s for s in streams if not s["disposition"]["attached_pic"])["nb_read_frames"])


# Files whose timestamps do not give the decoder's order, so the probe decodes them once.
_DAMAGED = ("concat_mp4", "concat_mkv", "concat_mkv_to_mp4", "concat_mp4_cut", "xvid_avi")


@pytest.mark.parametrize("name", [_case(n) for n in CASES])
def test_ffmpeg_made_file_is_exact(name):
    path = _made(name)
    pts, expected = sequential_decode(path)
    _, stored = sequential_decode(path, rotate=False)
    numbers = [frame_number(f) for f in stored]
    assert numbers == CASES[name].expected(len(expected))
    n = len(expected)
    with VideoReader(path, workers=2) as r:
        assert r.info.frame_count == n == _ffprobe_frames(path)
        assert r.info.frames_counted_by == ("decoding" if name in _DAMAGED else "packets")
        assert r.info.pts_unique == (name != "concat_mkv")
        plan = r.plan(indices=np.arange(n))
        np.testing.assert_allclose(plan.times_s, np.array(pts) * float(r.info.time_base), rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(r.read(plan).frames, expected)
        # Sparse, resized, out of order and repeated: each frame still the reference's.
        size = r.plan(num_frames=2, max_pixels=200_704).size
        _, resized = sequential_decode(path, size=size)
        wanted = np.concatenate([np.arange(n - 1, -1, -7), np.arange(1, n, 5), [n // 2]])
        np.testing.assert_array_equal(r.read(indices=wanted, size=size).frames, resized[wanted])
    assert not buffer_files()


@pytest.mark.parametrize("name", ["rotate_90", "rotate_270"])
def test_rotation_matches_ffmpeg_autorotate(name):
    path = _made(name)
    _, stored = sequential_decode(path, rotate=False)
    with VideoReader(path, workers=2) as r:
        assert r.info.rotation == {"rotate_90": 90, "rotate_270": -90}[name]
        displayed = r.read(indices=np.arange(len(stored))).frames
        assert (r.info.height, r.info.width) == displayed.shape[1:3] == stored.shape[2:0:-1]
    with VideoReader(path, workers=2, rotate=False) as r:
        np.testing.assert_array_equal(r.read(indices=np.arange(len(stored))).frames, stored)
    # ffmpeg's own autorotation (which players follow) turns the picture the same way: only its colour
    # conversion differs, by a level or two.
    result = subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True,
        timeout=FFMPEG_TIMEOUT_S,
        check=True,
    )
    theirs = np.frombuffer(result.stdout, np.uint8).reshape(displayed.shape)
    assert np.abs(theirs.astype(int) - displayed).mean() < 2.0


# Kr, Kb of the matrices FFmpeg's tags name; untagged video gets swscale's default, BT.601.
_MATRICES = {"bt709": (0.2126, 0.0722), "bt2020nc": (0.2627, 0.0593), "unspecified": (0.299, 0.114)}
_MATRICES.update(dict.fromkeys(("bt470bg", "smpte170m"), (0.299, 0.114)))


def _float_rgb(frame, kr: float, kb: float) -> tuple[np.ndarray, np.ndarray]:
    """The conversion with luma weights ``kr``, ``kb`` of a 4:2:0 frame's planes in float, chroma repeated
    over each 2 × 2 block; and where that chroma is flat (the 3 × 3 chroma samples around agree), so the way
    chroma is interpolated does not matter there."""
    bits = 10 if "10" in frame.format.name else 8
    dtype = np.uint16 if bits > 8 else np.uint8

    def plane(i):
        p = frame.planes[i]
        rows = np.frombuffer(p, dtype).reshape(p.height, p.line_size // dtype().itemsize)
        return rows[:, : p.width].astype(np.float64)

    y, u, v = plane(0), plane(1), plane(2)
    scale = 2 ** (bits - 8)
    full = frame.color_range == 2 or frame.format.name.startswith("yuvj")
    if full:
        top = 2**bits - 1
        y, cb, cr = y / top, (u - 128 * scale) / top, (v - 128 * scale) / top
    else:
        y, cb, cr = (
            (y - 16 * scale) / (219 * scale),
            (u - 128 * scale) / (224 * scale),
            (v - 128 * scale) / (224 * scale),
        )
    flat_c = np.ones(cb.shape, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            for c in (u, v):
                flat_c &= np.abs(np.roll(c, (dy, dx), (0, 1)) - c) <= scale
    flat_c[[0, -1], :] = flat_c[:, [0, -1]] = False
    h, w = y.shape

    def up(c):
        return np.repeat(np.repeat(c, 2, 0), 2, 1)[:h, :w]

    cb, cr, flat = up(cb), up(cr), up(flat_c)
    r = y + 2 * (1 - kr) * cr
    b = y + 2 * (1 - kb) * cb
    g = (y - kr * r - kb * b) / (1 - kr - kb)
    return np.clip(np.stack([r, g, b], -1) * 255, 0, 255), flat


# Cases whose flat areas keep the bars' saturated colours (the odd sizes blur them to grey edges).
_SATURATED = ("h264_high10", "hevc_main10_hdr", "h264_bt709_tagged", "h264_full_range_tagged")


@pytest.mark.parametrize("name", list(COLOUR))
def test_colour_conversion_follows_the_tags(name):
    if missing(name):
        pytest.skip(missing(name))
    path = colour_bars_video(name)
    _, converted = sequential_decode(path)
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            # At native size the conversion is PyAV's rgb24 default, which torchvision's read_video returns.
            if frame.color_range != 2 or frame.format.name.startswith("yuvj"):
                np.testing.assert_array_equal(converted[i], frame.to_ndarray(format="rgb24"))
            if i in (0, 13):
                tagged = COLOR_SPACES[int(frame.colorspace)]
                reference, flat = _float_rgb(frame, *_MATRICES[tagged])
                error = np.abs(converted[i].astype(np.float64) - reference)[flat]
                # swscale's fixed-point arithmetic (no ACCURATE_RND, as PyAV calls it) is off by a level or so.
                assert flat.mean() > 0.05 and error.max() <= 5.0 and error.mean() <= 2.0, (error.max(), error.mean())
                if name in _SATURATED:
                    # The check tells matrices apart: another one is far off on the same pixels.
                    other = "bt709" if _MATRICES[tagged] == _MATRICES["unspecified"] else "unspecified"
                    wrong, _ = _float_rgb(frame, *_MATRICES[other])
                    assert np.abs(converted[i].astype(np.float64) - wrong)[flat].max() >= 8.0


def test_decode_info_prints_the_probe(capsys):
    from qv_jax.cli import main

    path = _made("concat_mkv")
    assert main(["decode", "--info", str(path)]) == 0
    out = capsys.readouterr().out
    for text in ("h264", "yuv420p", "frames: 144, counted by decoding", "pts unique: no", "keyframes: "):
        assert text in out, text
    assert main(["decode", "--info", str(_made("rotate_90"))]) == 0
    assert "96x64 stored, rotation 90 degrees counter-clockwise, 64x96 as read" in capsys.readouterr().out
