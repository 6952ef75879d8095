"""The decode schedule on a synthetic stream: 400 frames, a keyframe every 10, decode order = presentation order."""

from fractions import Fraction

import numpy as np

from qv_jax.video.probe import FrameTable
from qv_jax.video.schedule import make_schedule

N, GOP = 400, 10


def table() -> FrameTable:
    frames = np.arange(N, dtype=np.int64)
    keys = np.arange(0, N, GOP, dtype=np.int64)
    return FrameTable(
        pts=frames,
        occurrence=np.zeros(N, np.int64),
        decode_pos=frames,
        key_index=keys,
        key_decode_pos=keys,
        key_pts=keys,
        key_dts=keys,
        time_base=Fraction(1, 24),
        file_size=0,
        file_mtime_ns=0,
    )


def covered_slots(schedule) -> list[int]:
    return [s for iv in schedule.intervals for s in range(iv.slot_start, iv.slot_stop)]


def test_dense_read_is_cut_into_balanced_runs():
    schedule = make_schedule(table(), np.arange(N), workers=2)
    # 400 frames of work, 4 runs per worker: 8 runs of 5 GOPs, one seek each.
    assert [iv.cost for iv in schedule.intervals] == [50] * 8
    assert [(iv.first_gop, iv.last_gop) for iv in schedule.intervals] == [(5 * k, 5 * k + 4) for k in range(8)]
    assert covered_slots(schedule) == list(range(N))
    assert schedule.cost == N


def test_each_gop_stops_at_its_last_wanted_frame():
    wanted = np.array([3, 13, 27, 104])  # offsets 3, 3, 7, 4 into GOPs 0, 1, 2, 10
    schedule = make_schedule(table(), wanted, workers=1)
    # One pass over GOPs 0-2 would decode 28 frames; a seek per GOP decodes 4 + 4 + 8.
    assert [(iv.first_gop, iv.last_gop, iv.cost) for iv in schedule.intervals] == [
        (0, 0, 4),
        (1, 1, 4),
        (2, 2, 8),
        (10, 10, 5),
    ]
    assert schedule.gops_decoded == 4 and schedule.gops_total == N // GOP


def test_sparse_frames_get_a_seek_each_and_skip_other_gops():
    wanted = np.arange(0, N, 40)  # the keyframe of every fourth GOP
    schedule = make_schedule(table(), wanted, workers=2)
    assert [iv.cost for iv in schedule.intervals] == [1] * 10
    assert [iv.first_gop for iv in schedule.intervals] == list(range(0, 40, 4))
    assert schedule.gops_decoded == 10


def test_adjacent_keyframes_are_not_merged_when_seeking_is_cheaper():
    # Keyframes of adjacent GOPs: one pass would decode 11 frames, two seeks decode 2.
    schedule = make_schedule(table(), np.array([0, 10]), workers=1)
    assert [iv.cost for iv in schedule.intervals] == [1, 1]


def test_repeats_and_order_map_back_through_inverse():
    wanted = np.array([55, 3, 55, 200])
    schedule = make_schedule(table(), wanted, workers=2)
    np.testing.assert_array_equal(schedule.unique, [3, 55, 200])
    np.testing.assert_array_equal(schedule.unique[schedule.inverse], wanted)


def test_seek_targets_fall_back_to_earlier_keyframes():
    schedule = make_schedule(table(), np.array([35]), workers=1)
    (interval,) = schedule.intervals
    assert interval.key_pts == 30
    assert interval.seek_targets == (30, 20, 10)  # pts and dts coincide here; then two earlier keyframes
