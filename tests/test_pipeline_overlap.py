"""The overlapped executor: decoding and transfers run ahead while the device is busy (shown by the order of
recorded events under an artificially slow device step), short groups padded, errors passed through."""

import threading
import time

import numpy as np
import pytest
from pipeline_helpers import _ROOT

from qv_jax.errors import VideoError
from qv_jax.pipeline.executor import Timeline, pad_group, run_overlapped
from qv_jax.testing.videos import make_sample_video
from qv_jax.video import Frames, VideoReader

SLOW_STEP_S = 0.5


def _frames(count: int, offset: int = 0) -> Frames:
    indices = np.arange(offset, offset + count)
    frames = np.broadcast_to(indices[:, None, None, None], (count, 4, 4, 3)).astype(np.uint8)
    return Frames(frames=frames, indices=indices, times_s=indices / 10.0, offset=offset)


def test_pad_group_repeats_the_last_frame():
    padded = pad_group(_frames(3, offset=8), 4)
    assert padded.frames.shape == (4, 4, 4, 3)
    np.testing.assert_array_equal(padded.frames[3], padded.frames[2])
    np.testing.assert_array_equal(padded.indices, [8, 9, 10])  # the plan's frames: padding is not a frame
    full = _frames(4)
    assert pad_group(full, 4) is full


@pytest.mark.slow
def test_decoding_and_transfers_run_ahead_of_a_slow_device():
    """One decoder process, whose next keyframe interval is assigned only as the stream is consumed: decoding is
    not paced by the device (every group is decoded before the slow device step finishes the first group, which
    prefetching alone, two groups deep, would not do), and each group's copy starts while the device is still on
    the group ahead of it."""
    video = make_sample_video(_ROOT / "overlap.mp4", seconds=8, fps=24, size=(180, 320), gop=12)
    timeline = Timeline()
    seen = []

    def slow_step(state, g: int, group: Frames) -> None:
        with timeline.span("vision", g):
            seen.append((g, group.frames.shape, threading.current_thread() is threading.main_thread()))
            time.sleep(SLOW_STEP_S)

    with VideoReader(video, workers=1) as reader:
        plan = reader.plan(fps=3.0)  # 24 frames in 6 groups of 4, spread over 4 keyframe intervals
        _, count = run_overlapped(reader.stream(plan, group_size=4), slow_step, group_frames=4, timeline=timeline)
    assert count == 6 and [s[0] for s in seen] == list(range(6))
    assert all(shape == (4, 180, 320, 3) and on_main for _, shape, on_main in seen)

    events = {(e.stage, e.group): e for e in timeline.events}
    for g in range(6):
        assert events[("decode", g)].end < events[("vision", 0)].end, g
    for g in range(1, 6):
        assert events[("transfer", g)].start < events[("vision", g - 1)].end, g


def test_stream_errors_reach_the_caller_and_stop_the_threads():
    def failing_stream():
        yield _frames(2)
        yield _frames(2, offset=2)
        raise VideoError("clip.mp4", "truncated packet")

    before = threading.active_count()
    done = []
    with pytest.raises(VideoError, match="truncated packet"):
        run_overlapped(failing_stream(), lambda state, g, group: done.append(g), group_frames=2, timeline=Timeline())
    assert done == [0, 1]
    assert threading.active_count() == before


def test_a_failing_step_closes_the_stream():
    closed = threading.Event()

    def endless():
        try:
            offset = 0
            while True:
                yield _frames(2, offset)
                offset += 2
        finally:
            closed.set()

    def step(state, g, group):
        if g == 1:
            raise RuntimeError("device step failed")

    with pytest.raises(RuntimeError, match="device step failed"):
        run_overlapped(endless(), step, group_frames=2, timeline=Timeline())
    assert closed.wait(5)


def test_timings_table_lists_stages_and_wall():
    timeline = Timeline()
    timeline.record("decode", 0, 0.0, 0.5)
    timeline.record("vision", 0, 0.2, 0.4)
    timeline.record("transfer", 0, 0.5, 0.5)
    timeline.record("wait", 1, 0.4, 0.5)
    timings = timeline.timings()
    assert list(timings.stages) == ["decode", "wait", "vision"]
    assert timings.busy_s == pytest.approx(0.7)
    table = timings.table()
    assert "decode" in table and "sum of stages" in table and "wall" in table and "transfer" not in table
