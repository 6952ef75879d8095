"""Decode schedule: the keyframe-aligned intervals that together produce a plan's frames.

Frames are grouped by GOP (the presentation-order span from one keyframe to the next). A GOP holding no wanted
frame is skipped. A GOP's decode cost is the number of packets from its keyframe to the last packet of a wanted
frame, in decode order, so decoding stops after the last wanted frame. Adjacent GOPs are decoded in one pass
(one seek) when that costs no more than seeking again, and passes are cut so that each is at most about
``1 / (CHUNKS_PER_WORKER × workers)`` of the total work: workers take intervals in presentation order as they
free up, which balances the load and lets frame groups complete roughly in order.

Open GOPs: the B-frames that precede a keyframe in presentation order but follow it in decode order belong to
the previous GOP's span, and that GOP's pass simply decodes on past the keyframe until they come out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qv_jax.video.probe import FrameTable

# Packets' worth of work that starting a new interval costs (demuxer seek, decoder flush and restart).
SEEK_COST = 2
# Target number of intervals per worker: more balances better and streams sooner; fewer seeks less.
CHUNKS_PER_WORKER = 4
# Earlier keyframes a worker may fall back to when a seek lands after the keyframe it asked for.
FALLBACK_KEYFRAMES = 2


@dataclass(frozen=True, eq=False)
class Interval:
    """One seek and one contiguous decode, filling slots ``slot_start:slot_stop``."""

    first_gop: int
    last_gop: int
    slot_start: int
    slot_stop: int
    key_pts: int
    key_pos: int | None  # the keyframe's byte position, when frames are known by position (damaged timestamps)
    seek_targets: tuple[int, ...]
    cost: int


@dataclass(frozen=True, eq=False)
class Schedule:
    """Intervals for a set of frame indices. Slot s holds frame ``unique[s]``; plan position p is slot
    ``inverse[p]``."""

    unique: np.ndarray
    inverse: np.ndarray
    intervals: tuple[Interval, ...]
    gops_total: int

    @property
    def gops_decoded(self) -> int:
        return sum(iv.last_gop - iv.first_gop + 1 for iv in self.intervals)

    @property
    def cost(self) -> int:
        return sum(iv.cost for iv in self.intervals)


def _seek_targets(table: FrameTable, gop: int) -> tuple[int, ...]:
    """Timestamps to seek to for keyframe ``gop``, best first: its pts (exact for MP4 / MKV / WebM), its dts
    (exact for MPEG-TS, which seeks by dts), then earlier keyframes in case the demuxer still lands too late."""
    targets = [int(table.key_pts[gop]), int(table.key_dts[gop])]
    for earlier in range(gop - 1, max(gop - 1 - FALLBACK_KEYFRAMES, -1), -1):
        targets.append(min(int(table.key_pts[earlier]), int(table.key_dts[earlier])))
    if table.by_position:
        # Damaged timestamps are not monotonic: below every keyframe so far, the demuxer lands before ours.
        targets.append(min(int(table.key_pts[: gop + 1].min()), int(table.key_dts[: gop + 1].min())) - 1)
    return tuple(dict.fromkeys(targets))


def make_schedule(table: FrameTable, indices: np.ndarray, workers: int) -> Schedule:
    """Plan the intervals that decode ``indices`` with ``workers`` processes."""
    unique, inverse = np.unique(indices, return_inverse=True)
    gop_of = np.maximum(np.searchsorted(table.key_index, unique, side="right") - 1, 0)
    decode_pos = table.decode_pos[unique]
    gops, gop_starts = np.unique(gop_of, return_index=True)
    gop_stops = np.append(gop_starts[1:], unique.size)
    ends = np.maximum.reduceat(decode_pos, gop_starts)
    starts = table.key_decode_pos[gops]
    costs = ends - starts + 1
    target = max(int(costs.max()), math.ceil(int(costs.sum()) / (max(workers, 1) * CHUNKS_PER_WORKER)))

    intervals: list[Interval] = []
    run: dict | None = None

    def close(run: dict) -> None:
        intervals.append(
            Interval(
                first_gop=run["first"],
                last_gop=run["last"],
                slot_start=run["slot_start"],
                slot_stop=run["slot_stop"],
                key_pts=int(table.key_pts[run["first"]]),
                key_pos=int(table.key_pos[run["first"]]) if table.by_position else None,
                seek_targets=_seek_targets(table, run["first"]),
                cost=run["cost"],
            )
        )

    for g, start, end, cost, slot_start, slot_stop in zip(
        gops.tolist(),
        starts.tolist(),
        ends.tolist(),
        costs.tolist(),
        gop_starts.tolist(),
        gop_stops.tolist(),
        strict=True,
    ):
        if run is not None and g == run["last"] + 1:
            merged = max(run["end"], end) - run["start"] + 1
            if merged <= run["separate"] + cost + SEEK_COST and merged <= target:
                run.update(last=g, end=max(run["end"], end), cost=merged, slot_stop=slot_stop)
                run["separate"] += cost
                continue
        if run is not None:
            close(run)
        run = dict(
            first=g, last=g, start=start, end=end, cost=cost, separate=cost, slot_start=slot_start, slot_stop=slot_stop
        )
    close(run)
    return Schedule(
        unique=unique,
        inverse=inverse.astype(np.int64),
        intervals=tuple(intervals),
        gops_total=int(table.key_index.size),
    )
