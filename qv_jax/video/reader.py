"""VideoReader: probe on open, plan without decoding, read or stream frames decoded in parallel."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from qv_jax.errors import InputError, VideoError
from qv_jax.video import sampling
from qv_jax.video.buffer import FrameBuffer
from qv_jax.video.plan import FramePlan, make_plan
from qv_jax.video.pool import cap_workers, default_pool, new_task_id, run_tasks
from qv_jax.video.probe import VideoInfo, probe
from qv_jax.video.schedule import Schedule, make_schedule

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_GROUP_SIZE = 16


@dataclass(frozen=True, eq=False)
class Frames:
    """Decoded frames: ``frames`` uint8 [frames, height, width, 3] RGB, with their presentation-order ``indices``
    and pts in seconds ``times_s``. A streamed group also says where it starts in its plan (``offset``)."""

    frames: np.ndarray
    indices: np.ndarray
    times_s: np.ndarray
    offset: int = 0

    def __len__(self) -> int:
        return int(self.indices.size)


@dataclass(frozen=True)
class DecodeStats:
    """What one read cost. ``frames_decoded`` counts every frame the decoders produced, including those decoded
    only to reach a wanted frame; ``gops_decoded`` of ``gops_total`` keyframe intervals were touched."""

    frames_returned: int
    frames_decoded: int
    packets_decoded: int
    intervals: int
    seeks: int
    gops_decoded: int
    gops_total: int
    workers: int
    seconds: float


class VideoReader:
    """Exact, parallel frame reads from one video file.

    ``VideoReader(path, workers=None)`` probes the file (one demux pass, see :mod:`qv_jax.video.probe`) and
    starts decoder processes in the background; ``workers=None`` means one per CPU this process may use, and a
    larger ``workers`` is cut to that with a warning (a read also uses at most one per interval). ``timeout_s``
    is how long a worker may stay silent before the read fails. Frames come back as displayed: turned by the stream's
    display matrix (``info.rotation``), with sizes and Qwen's ``smart_resize`` for that orientation;
    ``rotate=False`` gives the stored frames. Use as a context manager.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        workers: int | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        rotate: bool = True,
    ):
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise InputError(f"workers must be a positive integer or None, got {workers!r}")
        if not timeout_s > 0:
            raise InputError(f"timeout_s must be positive, got {timeout_s!r}")
        self.path = os.fspath(path)
        self.workers, note = cap_workers(workers)
        if note:
            warnings.warn(note, stacklevel=2)
        self.timeout_s = float(timeout_s)
        self.rotate = bool(rotate)
        self.last_stats: DecodeStats | None = None
        self._closed = False
        default_pool().prestart(self.workers)  # workers boot while we probe
        self.info: VideoInfo
        self.info, self._table = probe(self.path)

    def plan(
        self,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        fps: float | None = None,
        num_frames: int | None = None,
        size: Sequence[int] | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        total_pixels: float | None = None,
        min_frames: int = sampling.FPS_MIN_FRAMES,
        max_frames: int | None = None,
        interpolation: str = "bicubic",
    ) -> FramePlan:
        """Which frames a read returns and at what size, computed from the probe alone (no decoding).

        Frames: ``indices`` (any order, repeats allowed), or Qwen's uniform sampling with ``fps`` (default 2.0,
        clamped to ``[min_frames, max_frames]``, max default ``min(768, frame_count)``) or ``num_frames``
        (rounded to even). Size: ``size=(height, width)`` exactly, or Qwen's ``smart_resize`` within the video
        pixel budget when any of ``min_pixels`` / ``max_pixels`` / ``total_pixels`` is given, else native.
        ``interpolation`` is the swscale filter for resizing (bicubic, as Qwen resizes).
        """
        return make_plan(
            self.info,
            self._table,
            indices=indices,
            fps=fps,
            num_frames=num_frames,
            size=size,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            total_pixels=total_pixels,
            min_frames=min_frames,
            max_frames=max_frames,
            interpolation=interpolation,
            rotate=self.rotate,
        )

    def read(self, plan: FramePlan | None = None, **options) -> Frames:
        """Decode a plan's frames (or plan them from ``options``, the keywords of :meth:`plan`) and return them
        all. Sorted, distinct indices come back as a view of the shared buffer, without a copy."""
        plan = self._resolve(plan, options)
        (frames,) = self._stream(plan, plan.num_frames)  # one group of everything
        return frames

    def stream(
        self, plan: FramePlan | None = None, *, group_size: int = DEFAULT_GROUP_SIZE, **options
    ) -> Iterator[Frames]:
        """Yield the plan's frames in groups of ``group_size`` (the last may be shorter), in plan order, each as
        soon as all its frames are decoded. Closing the generator early cancels the remaining work."""
        if not isinstance(group_size, int) or group_size < 1:
            raise InputError(f"group_size must be a positive integer, got {group_size!r}")
        return self._stream(self._resolve(plan, options), group_size)

    def _stream(self, plan: FramePlan, group_size: int) -> Iterator[Frames]:
        schedule = make_schedule(self._table, plan.indices, self.workers)
        start = time.perf_counter()
        buffer, job, stats = self._start(plan, schedule)
        identity = _is_identity(schedule, plan)
        done = np.zeros(schedule.unique.size, bool)
        groups = range(0, plan.num_frames, group_size)
        next_group = 0
        try:
            for slots in job:
                done[slots] = True
                while next_group < len(groups):
                    lo = groups[next_group]
                    hi = min(lo + group_size, plan.num_frames)
                    wanted = schedule.inverse[lo:hi]
                    if not done[wanted].all():
                        break
                    frames = buffer.frames[lo:hi] if identity else buffer.frames[wanted]
                    yield Frames(frames=frames, indices=plan.indices[lo:hi], times_s=plan.times_s[lo:hi], offset=lo)
                    next_group += 1
        finally:
            job.close()
            buffer.unlink()
        self._record(plan, schedule, stats, start)

    def _resolve(self, plan: FramePlan | None, options: dict) -> FramePlan:
        if self._closed:
            raise VideoError(self.path, "reader is closed")
        if plan is None:
            return self.plan(**options)
        if options:
            raise InputError(f"give either a plan or plan keywords, not both (got {', '.join(sorted(options))})")
        if not isinstance(plan, FramePlan):
            raise InputError(f"plan must be a FramePlan, got {type(plan).__name__}")
        if plan.rotation != (self.info.rotation if self.rotate else 0):
            raise InputError(f"plan turns frames by {plan.rotation} degrees; this reader of {self.path} does not")
        if plan.frame_count != self.info.frame_count:
            raise InputError(
                f"plan was made for a video of {plan.frame_count} frames; {self.path} has {self.info.frame_count}"
            )
        return plan

    def _start(self, plan: FramePlan, schedule: Schedule):
        """Allocate the frame buffer and create the job that fills it (it starts when first iterated)."""
        try:
            buffer = FrameBuffer(schedule.unique.size, plan.height, plan.width)
        except MemoryError as e:
            raise InputError(
                f"{self.path}: {schedule.unique.size} frames of {plan.width}x{plan.height} do not fit in shared "
                f"memory: {e}; ask for fewer frames or a smaller size"
            ) from e
        try:
            tasks = self._tasks(plan, schedule, buffer)
        except BaseException:
            buffer.unlink()
            raise
        stats: dict = {}
        job = run_tasks(default_pool(), tasks, self.workers, self.timeout_s, self.path, stats)
        return buffer, job, stats

    def _tasks(self, plan: FramePlan, schedule: Schedule, buffer: FrameBuffer) -> list[dict]:
        """One worker task per interval: where to seek, which pts to keep, which buffer slot each goes to."""
        table, unique = self._table, schedule.unique
        common = {
            "path": os.path.abspath(self.path),
            "stream": self.info.stream_index,
            "file_size": table.file_size,
            "file_mtime_ns": table.file_mtime_ns,
            "buffer": buffer.path,
            "buffer_bytes": buffer.nbytes,
            "height": plan.height,
            "width": plan.width,
            "interpolation": plan.interpolation,
            "rotation": plan.rotation,
        }
        tasks = []
        for interval in schedule.intervals:
            frames = unique[interval.slot_start : interval.slot_stop]
            tasks.append(
                {
                    **common,
                    "id": new_task_id(),
                    "key_pts": interval.key_pts,
                    "key_pos": interval.key_pos,
                    "pos": table.pos[frames],
                    "seek_targets": interval.seek_targets,
                    "pts": table.pts[frames],
                    "occurrence": table.occurrence[frames],
                    "slots": np.arange(interval.slot_start, interval.slot_stop, dtype=np.int64),
                    "first_index": int(frames[0]),
                    "last_index": int(frames[-1]),
                }
            )
        return tasks

    def _record(self, plan: FramePlan, schedule: Schedule, stats: dict, start: float) -> None:
        self.last_stats = DecodeStats(
            frames_returned=plan.num_frames,
            frames_decoded=stats.get("frames_decoded", 0),
            packets_decoded=stats.get("packets", 0),
            intervals=len(schedule.intervals),
            seeks=stats.get("seeks", 0),
            gops_decoded=schedule.gops_decoded,
            gops_total=schedule.gops_total,
            workers=min(self.workers, len(schedule.intervals)),
            seconds=time.perf_counter() - start,
        )

    def close(self) -> None:
        """Mark the reader closed. Worker processes belong to the shared pool and stay up for other readers."""
        self._closed = True

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        return (
            f"VideoReader({self.path!r}, {i.frame_count} frames, {i.width}x{i.height} {i.codec}, "
            f"{i.avg_fps:.3f} fps, workers={self.workers})"
        )


def _is_identity(schedule: Schedule, plan: FramePlan) -> bool:
    """Whether plan position p is slot p (indices sorted and distinct), so the buffer is the answer as is."""
    return schedule.unique.size == plan.num_frames and bool(np.all(schedule.unique == plan.indices))
