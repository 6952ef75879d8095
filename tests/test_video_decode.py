"""Parallel decoding returns exactly the frames a sequential PyAV decode returns, for every kind of input.

The reference decodes each generated video front to back in one pass and converts every frame with the same
swscale call the workers make; the parallel read must match it bit for bit, at native size and resized.
"""

import numpy as np
import pytest
from video_helpers import (
    DERIVED,
    VIDEOS,
    assert_full_read_exact,
    buffer_files,
    long_video,
    remux,
    scratch,
    sequential_decode,
    video,
)

from qv_jax.errors import InputError
from qv_jax.video import VideoReader, frame_number, make_sample_video, sampling
from qv_jax.video import buffer as buffer_module
from qv_jax.video.pool import cpu_limit

NAMES = sorted(VIDEOS) + sorted(DERIVED)


@pytest.mark.parametrize("name", NAMES)
def test_probe_matches_sequential_decode(name):
    path = video(name)
    pts, frames = sequential_decode(path)
    with VideoReader(path, workers=1) as r:
        info = r.info
        assert info.frame_count == len(pts)
        # Frame i is the i-th frame a sequential decode outputs.
        times = r.plan(indices=np.arange(len(pts))).times_s
        np.testing.assert_allclose(times, np.array(pts) * float(info.time_base), rtol=1e-12, atol=1e-12)
        numbers = [frame_number(f) for f in frames]
        if name == "mp4_cut_mid_gop":
            # The cut hides the sample's frames 12-16 (keyframe 12 among them); its keyframes 24, 36, ... remain.
            assert numbers == list(range(17, 72))
            np.testing.assert_array_equal(info.keyframe_indices, [24 - 17, 36 - 17, 48 - 17, 60 - 17])
        else:
            assert numbers == list(range(len(pts)))
            assert info.keyframe_indices[0] == 0
        assert (info.height, info.width) == frames.shape[1:3]


@pytest.mark.parametrize("name", NAMES)
def test_parallel_read_is_bit_exact(name):
    path = video(name)
    _, expected = sequential_decode(path)
    n = len(expected)
    with VideoReader(path, workers=2) as r:
        got = r.read(indices=np.arange(n))
        np.testing.assert_array_equal(got.frames, expected)
        np.testing.assert_array_equal(got.indices, np.arange(n))
        # Sparse, resized reads in Qwen's size: every fifth frame and the last, every third from the second
        # (unwanted frames that nothing references are skipped, which must not change the others).
        _, resized = sequential_decode(path, size=r.plan(num_frames=2, max_pixels=200_704).size)
        for wanted in (np.unique(np.append(np.arange(0, n, 5), n - 1)), np.arange(min(1, n - 1), n, 3)):
            np.testing.assert_array_equal(r.read(indices=wanted, size=resized.shape[1:3]).frames, resized[wanted])
    assert not buffer_files()


@pytest.mark.parametrize("name", ["h264_open_gop", "mpegts_open_gop", "hevc", "vfr_mkv"])
def test_stream_groups_match_read(name):
    path = video(name)
    _, expected = sequential_decode(path, size=(40, 56), interpolation="bilinear")
    with VideoReader(path, workers=2) as r:
        plan = r.plan(num_frames=len(expected) - len(expected) % 2, size=(40, 56), interpolation="bilinear")
        groups = list(r.stream(plan, group_size=5))
    assert [g.offset for g in groups] == list(range(0, plan.num_frames, 5))
    assert all(len(g) == 5 for g in groups[:-1]) and 1 <= len(groups[-1]) <= 5
    frames = np.concatenate([g.frames for g in groups])
    np.testing.assert_array_equal(frames, expected[plan.indices])
    np.testing.assert_array_equal(np.concatenate([g.indices for g in groups]), plan.indices)
    np.testing.assert_array_equal(np.concatenate([g.times_s for g in groups]), plan.times_s)


def test_unsorted_and_repeated_indices():
    path = video("h264_open_gop")
    _, expected = sequential_decode(path)
    wanted = [40, 3, 3, 71, 0, 40, 12]
    with VideoReader(path, workers=2) as r:
        got = r.read(indices=wanted)
        np.testing.assert_array_equal(got.frames, expected[wanted])
        groups = list(r.stream(indices=wanted, group_size=3))
    np.testing.assert_array_equal(np.concatenate([g.frames for g in groups]), expected[wanted])


@pytest.mark.parametrize("workers", [1, min(3, cpu_limit())])  # more than the CPUs is cut to them
def test_worker_count_does_not_change_frames(workers):
    assert_full_read_exact(video("mpegts"), workers)


def test_video_info_from_packets():
    with VideoReader(video("nonzero_start"), workers=1) as r:
        assert r.info.start_time_s == pytest.approx(3.25)
        assert r.info.frame_count == 48
        assert r.info.avg_fps == pytest.approx(24.0)
        assert r.info.duration_s == pytest.approx(2.0)
        np.testing.assert_array_equal(r.info.keyframe_indices, [0, 10, 20, 30, 40])
        assert r.plan(indices=[0]).times_s[0] == pytest.approx(3.25)
    with VideoReader(video("vfr_mkv"), workers=1) as r:
        # Frame times follow the sample's duration pattern, not frame_index / fps.
        pattern = np.array([1.0, 1.75, 0.5, 1.25, 0.75, 2.0, 1.0, 0.75]) / 24
        expected = np.concatenate([[0.0], np.cumsum(np.resize(pattern, 71))])
        assert r.info.frame_count == 72
        np.testing.assert_allclose(r.plan(indices=np.arange(72)).times_s, expected, atol=1e-3)
        assert r.info.duration_s > expected[-1]
        assert r.info.avg_fps == pytest.approx(72 / r.info.duration_s)
    with VideoReader(video("with_audio"), workers=1) as r:
        assert r.info.codec == "h264" and r.info.rotation == 0 and r.info.frame_count == 48


@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_rotation_is_applied_unless_asked_not_to(degrees):
    path = remux(video("h264_bframes"), f"rotated_{degrees}.mp4", rotation=degrees)
    _, stored = sequential_decode(video("h264_bframes"))
    displayed = np.rot90(stored, degrees // 90, axes=(1, 2))
    with VideoReader(path, workers=2) as r:
        assert r.info.rotation == degrees
        assert (r.info.height, r.info.width) == displayed.shape[1:3]
        assert (r.info.stored_height, r.info.stored_width) == stored.shape[1:3]
        np.testing.assert_array_equal(r.read(indices=[0, 40]).frames, displayed[[0, 40]])
        # Qwen's smart_resize sees the displayed orientation.
        turned = r.plan(num_frames=2, min_pixels=8 * 28 * 28, max_pixels=200_704).size
        displayed_plan = r.plan(indices=[0])
    with VideoReader(path, workers=2, rotate=False) as r:
        with pytest.raises(InputError, match="turns frames"):
            r.read(displayed_plan)
        np.testing.assert_array_equal(r.read(indices=[0, 40]).frames, stored[[0, 40]])
        assert r.plan(indices=[0]).size == stored.shape[1:3]
        upright = r.plan(num_frames=2, min_pixels=8 * 28 * 28, max_pixels=200_704).size
    assert turned == (upright[::-1] if degrees % 180 else upright)


def test_sparse_sampling_decodes_only_needed_gops():
    path = long_video(1500, gop=24)  # 62.5 GOPs
    with VideoReader(path, workers=2) as r:
        plan = r.plan(num_frames=16)
        frames = r.read(plan).frames
        stats = r.last_stats
    needed_gops = np.unique(plan.indices // 24)
    assert stats.gops_decoded == needed_gops.size == 16 < stats.gops_total
    # Each interval stops at its wanted frame: at most one GOP of decoding per wanted frame.
    assert stats.frames_decoded <= 16 * 24 < 1500
    assert [frame_number(f) for f in frames] == list(plan.indices)


def test_dense_sampling_decodes_each_frame_once():
    path = long_video(1500, gop=24)
    with VideoReader(path, workers=2) as r:
        r.read(indices=np.arange(1500))
        stats = r.last_stats
    assert stats.frames_decoded == 1500
    assert stats.intervals >= 2 * 2  # the work was cut for both workers


def test_file_backed_buffer_when_shared_memory_is_short(monkeypatch):
    monkeypatch.setattr(buffer_module, "_free_bytes", lambda d: 0 if d == buffer_module.SHM_DIR else 1 << 40)
    assert_full_read_exact(video("h264_bframes"))
    assert not buffer_files()


def test_no_room_anywhere_is_an_input_error(monkeypatch):
    # A sparse file larger than the disk maps fine, then kills its writers with SIGBUS: refuse it up front.
    monkeypatch.setattr(buffer_module, "_free_bytes", lambda directory: 0)
    with VideoReader(video("h264_bframes"), workers=1) as r, pytest.raises(InputError, match="do not fit in shared"):
        r.read(num_frames=8)
    assert not buffer_files()


@pytest.mark.slow
def test_more_than_15000_frames():
    # QuickCodec passed its index map on a command line and failed past ~13k frames.
    path = make_sample_video(scratch("many.mp4"), num_frames=15_360, size=(32, 32), gop=250, bframes=2, texture=False)
    _, expected = sequential_decode(path)
    with VideoReader(path, workers=2) as r:
        plan = r.plan(num_frames=15_200)
        assert plan.num_frames == 15_200
        np.testing.assert_array_equal(plan.indices, sampling.sample_indices(15_360, 15_200))
        got = r.read(plan)
    np.testing.assert_array_equal(got.frames, expected[plan.indices])
