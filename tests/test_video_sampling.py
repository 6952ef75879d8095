"""Qwen's sampling rules (frame count, indices, pixel budget, smart_resize) and FramePlan, checked against an
independent restatement of qwen-vl-utils 0.0.14 and against torch.linspace itself."""

import math

import numpy as np
import pytest
import torch
from video_helpers import video

from qv_jax.errors import InputError
from qv_jax.video import VideoReader, sampling


def qwen_nframes(total_frames, video_fps, fps=None, nframes=None, min_frames=None, max_frames=None):
    """qwen-vl-utils' smart_nframes, restated from its source."""
    if nframes is not None:
        n = round(nframes / 2) * 2
    else:
        fps = 2.0 if fps is None else fps
        low = math.ceil((4 if min_frames is None else min_frames) / 2) * 2
        high = math.floor((min(768, total_frames) if max_frames is None else max_frames) / 2) * 2
        n = total_frames / video_fps * fps
        n = math.floor(min(min(max(n, low), high), total_frames) / 2) * 2
    if not 2 <= n <= total_frames:
        raise ValueError(n)
    return n


def qwen_max_pixels(nframes, min_pixels=None, max_pixels=None, total_pixels=None):
    """qwen-vl-utils' per-frame pixel cap for a video of nframes sampled frames, restated."""
    low = 128 * 28 * 28 if min_pixels is None else min_pixels
    total = 128000 * 28 * 28 * 0.9 if total_pixels is None else total_pixels
    cap = max(min(768 * 28 * 28, total / nframes * 2), int(low * 1.05))
    return low, cap if max_pixels is None else min(max_pixels, cap)


def qwen_resize(height, width, min_pixels, max_pixels, factor=28):
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = (
            max(factor, math.floor(height / beta / factor) * factor),
            max(factor, math.floor(width / beta / factor) * factor),
        )
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


FPS_CASES = [
    (total, video_fps, fps)
    for total in (2, 3, 5, 9, 48, 61, 240, 1001, 1800, 7200, 86400, 216000)
    for video_fps in (1.0, 23.976, 24.0, 29.97, 30.0, 59.94, 120.0)
    for fps in (None, 0.5, 1.0, 2.0, 4.0, 24.0)
]


@pytest.mark.parametrize(("total", "video_fps", "fps"), FPS_CASES)
def test_frame_count_follows_qwen_fps_rule(total, video_fps, fps):
    try:
        expected = qwen_nframes(total, video_fps, fps=fps)
    except ValueError:
        with pytest.raises(InputError):
            sampling.smart_nframes(total, video_fps, fps=fps)
        return
    assert sampling.smart_nframes(total, video_fps, fps=fps) == expected


@pytest.mark.parametrize("nframes", [1, 2, 3, 5, 6, 7, 63, 64, 65, 767, 1023])
@pytest.mark.parametrize("total", [4, 64, 1000])
def test_frame_count_follows_qwen_nframes_rule(total, nframes):
    try:
        expected = qwen_nframes(total, 24.0, nframes=nframes)
    except ValueError:
        with pytest.raises(InputError):
            sampling.smart_nframes(total, 24.0, num_frames=nframes)
        return
    assert sampling.smart_nframes(total, 24.0, num_frames=nframes) == expected


def test_frame_count_bounds_can_be_overridden():
    assert sampling.smart_nframes(100_000, 30.0, max_frames=2048) == qwen_nframes(100_000, 30.0, max_frames=2048)
    assert sampling.smart_nframes(60, 30.0, min_frames=16) == qwen_nframes(60, 30.0, min_frames=16) == 16
    assert sampling.smart_nframes(20, 30.0, fps=0.1, min_frames=5) == 6  # min rounds up to even


def test_frame_count_rejects_bad_requests():
    with pytest.raises(InputError, match="not both"):
        sampling.smart_nframes(100, 24.0, fps=1.0, num_frames=8)
    with pytest.raises(InputError, match="fps must be positive"):
        sampling.smart_nframes(100, 24.0, fps=0.0)
    with pytest.raises(InputError, match=r"\[2, 100\]"):
        sampling.smart_nframes(100, 24.0, num_frames=103)  # 103 rounds to 104 (101 would round to 100)


@pytest.mark.parametrize(("total", "n"), [(2, 2), (5, 4), (48, 4), (61, 20), (1000, 64), (1001, 768), (7200, 7200)])
def test_indices_equal_rounded_linspace_on_short_videos(total, n):
    expected = np.round(np.linspace(0, total - 1, n)).astype(np.int64)
    np.testing.assert_array_equal(sampling.sample_indices(total, n), expected)


def test_indices_equal_torch_linspace_bit_for_bit():
    # Long videos: float32 linspace rounds differently from float64, and qwen-vl-utils uses torch's.
    rng = np.random.default_rng(0)
    cases = [(99_999, 15_000), (216_000, 768), (1_000_003, 1024), (4_000_000, 2)]
    cases += [(int(t), int(rng.integers(2, min(t, 20_000) + 1))) for t in rng.integers(2, 5_000_000, 300)]
    for total, n in cases:
        expected = torch.linspace(0, total - 1, n).round().long().numpy()
        np.testing.assert_array_equal(sampling.sample_indices(total, n), expected, err_msg=f"{total=} {n=}")


@pytest.mark.parametrize("nframes", [2, 4, 16, 64, 256, 768, 1024, 4096])
@pytest.mark.parametrize(
    "bounds", [{}, {"max_pixels": 448 * 448}, {"min_pixels": 64 * 28 * 28}, {"total_pixels": 24576 * 28 * 28}]
)
def test_pixel_budget_follows_qwen(nframes, bounds):
    assert sampling.video_pixel_bounds(nframes, **bounds) == qwen_max_pixels(nframes, **bounds)


@pytest.mark.parametrize(
    ("height", "width"), [(1080, 1920), (720, 1280), (64, 64), (48, 64), (53, 75), (1, 150), (2160, 3840), (607, 1080)]
)
@pytest.mark.parametrize("max_pixels", [200_704, 602_112, 12_845_056])
def test_smart_resize_follows_qwen(height, width, max_pixels):
    min_pixels = 100_352
    assert sampling.smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels) == qwen_resize(
        height, width, min_pixels, max_pixels
    )


def test_smart_resize_known_sizes():
    assert sampling.smart_resize(1080, 1920, max_pixels=448 * 448) == (336, 588)
    # Tiny frames are scaled up to the video minimum of 128 tokens' worth of pixels.
    assert sampling.smart_resize(64, 64) == (336, 336)
    with pytest.raises(InputError, match="aspect ratio"):
        sampling.smart_resize(1, 300)


def test_sample_fps_as_qwen_reports_it():
    assert sampling.sample_fps(64, 1440, 24.0) == pytest.approx(64 / 1440 * 24.0)


# FramePlan on a probed video: 3 s of 24 fps H.264, 160x120.


def test_plan_uses_qwen_rules_by_default():
    with VideoReader(video("h264_bframes"), workers=1) as r:
        plan = r.plan()
        total = r.info.frame_count
        n = qwen_nframes(total, r.info.avg_fps)
        np.testing.assert_array_equal(plan.indices, np.round(np.linspace(0, total - 1, n)))
        assert plan.size == (120, 160)
        assert plan.sample_fps == pytest.approx(n / total * 24.0)
        assert plan.second_per_grid_t == pytest.approx(2 / plan.sample_fps)
        np.testing.assert_allclose(plan.times_s, plan.indices / 24.0)


def test_plan_sizes():
    with VideoReader(video("h264_bframes"), workers=1) as r:
        assert r.plan(num_frames=8, size=(30, 40)).size == (30, 40)
        low, high = qwen_max_pixels(8, max_pixels=200_704)
        assert r.plan(num_frames=8, max_pixels=200_704).size == qwen_resize(120, 160, low, high)
        # total_pixels alone selects Qwen sizing with the default bounds.
        low, high = qwen_max_pixels(8)
        assert r.plan(num_frames=8, total_pixels=sampling.VIDEO_TOTAL_PIXELS).size == qwen_resize(120, 160, low, high)


def test_plan_indices_keep_order_and_repeats():
    with VideoReader(video("h264_bframes"), workers=1) as r:
        plan = r.plan(indices=[5, 3, 3, 70])
        np.testing.assert_array_equal(plan.indices, [5, 3, 3, 70])
        assert not plan.indices.flags.writeable


def test_single_frame_video_repeats_its_frame():
    with VideoReader(video("single_frame"), workers=1) as r:
        np.testing.assert_array_equal(r.plan().indices, [0, 0])
        np.testing.assert_array_equal(r.plan(num_frames=8).indices, [0, 0])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fps": 1.0, "num_frames": 4}, "not fps and num_frames"),
        ({"indices": [0], "fps": 1.0}, "not indices and fps"),
        ({"num_frames": 1000}, r"\[2, 72\]"),
        ({"indices": [0, 72]}, "frame index 72 is out of range"),
        ({"indices": [-1]}, "out of range"),
        ({"indices": []}, "non-empty"),
        ({"indices": [0.5]}, "must be integers"),
        ({"size": (0, 10)}, "must be positive"),
        ({"size": (10, 10), "max_pixels": 1000}, "not both"),
        ({"interpolation": "cubic"}, "interpolation"),
    ],
)
def test_plan_rejects_bad_requests(options, message):
    with VideoReader(video("h264_bframes"), workers=1) as r, pytest.raises(InputError, match=message):
        r.plan(**options)
