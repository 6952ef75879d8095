"""The overlapped executor: decoding on the CPU pool, transfers and device steps at the same time, timed.

A thread drains the decoder pool into a host queue (groups ``g+1, g+2, ...`` decode while the device works on
``g``), ``qv_jax.video.prefetch`` copies the next group to the device, and the caller's step runs on the main
thread. Every stage reports spans to a :class:`Timeline`; :class:`Timings` sums them (with overlap the stages add
up to more than the wall). See docs/videoqa.md, "What happens" and "Timings".
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

from qv_jax.errors import InputError
from qv_jax.video.prefetcher import prefetch
from qv_jax.video.reader import Frames

State = TypeVar("State")

# Stages in the order reports list them; "transfer" events are instants (when a copy started), not busy time.
STAGES = ("load", "probe", "decode", "wait", "vision", "prefill", "answer")


@dataclass(frozen=True)
class StageEvent:
    """``stage`` was busy with ``group`` (-1: not group-wise) from ``start`` to ``end`` seconds after the run
    began."""

    stage: str
    group: int
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


class Timeline:
    """Thread-safe record of stage spans, with a clock started at construction.

    ``listener`` (optional) is called with each event as it is recorded, from whichever thread records it (the CLI
    drives its progress bars with it). A listener with a ``started(stage, group)`` method is also told when each
    :meth:`span` begins, on the thread that runs it.
    """

    def __init__(self, listener: Callable[[StageEvent], None] | None = None):
        self._origin = time.perf_counter()
        self._events: list[StageEvent] = []
        self._lock = threading.Lock()
        self._listener = listener
        self._started = getattr(listener, "started", None)

    def now(self) -> float:
        return time.perf_counter() - self._origin

    def record(self, stage: str, group: int, start: float, end: float | None = None) -> StageEvent:
        event = StageEvent(stage, group, start, self.now() if end is None else end)
        with self._lock:
            self._events.append(event)
        if self._listener is not None:
            self._listener(event)
        return event

    @contextlib.contextmanager
    def span(self, stage: str, group: int = -1):
        """Record the time the ``with`` body takes as a span of ``stage``."""
        start = self.now()
        if self._started is not None:
            self._started(stage, group)
        try:
            yield
        finally:
            self.record(stage, group, start)

    @property
    def events(self) -> tuple[StageEvent, ...]:
        with self._lock:
            return tuple(self._events)

    def timings(self) -> Timings:
        """Busy seconds per stage and the wall time so far."""
        events = self.events
        stages: dict[str, float] = {}
        for event in events:
            if event.stage != "transfer":
                stages[event.stage] = stages.get(event.stage, 0.0) + event.seconds
        ordered = {s: stages.pop(s) for s in STAGES if s in stages} | stages
        return Timings(stages=ordered, wall_s=self.now(), events=events)


@dataclass(frozen=True)
class Timings:
    """Where the time of one request went: ``stages`` maps a stage to its busy seconds, ``wall_s`` is the elapsed
    time, ``events`` every recorded span. Stages overlap, so their sum may exceed the wall time."""

    stages: dict[str, float]
    wall_s: float
    events: tuple[StageEvent, ...] = ()

    @property
    def busy_s(self) -> float:
        """Sum of the busy stages, not counting ``wait`` (idle time of the device loop)."""
        return sum(s for name, s in self.stages.items() if name != "wait")

    def as_dict(self) -> dict[str, float]:
        return {**{f"{name}_s": s for name, s in self.stages.items()}, "busy_s": self.busy_s, "wall_s": self.wall_s}

    def table(self) -> str:
        """A plain-text table: each stage's busy seconds and share of the wall time."""
        rows = [(name, s) for name, s in self.stages.items()] + [("sum of stages", self.busy_s), ("wall", self.wall_s)]
        width = max(len(name) for name, _ in rows)
        lines = [f"{'stage'.ljust(width)}  {'seconds':>8}  {'of wall':>7}"]
        for name, seconds in rows:
            share = f"{100 * seconds / self.wall_s:6.0f}%" if self.wall_s > 0 else ""
            lines.append(f"{name.ljust(width)}  {seconds:8.3f}  {share:>7}")
        return "\n".join(lines)


_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def pad_group(group: Frames, group_frames: int) -> Frames:
    """A short last group padded to ``group_frames`` frames by repeating its last frame (the padding's tokens are
    masked downstream); full groups are returned as they are."""
    missing = group_frames - len(group)
    if missing < 0:
        raise InputError(f"a group of {len(group)} frames exceeds group_frames={group_frames}")
    if missing == 0:
        return group
    frames = np.concatenate([group.frames, np.repeat(group.frames[-1:], missing, axis=0)])
    return replace(group, frames=frames)


class DecodeAhead:
    """Drains a frame-group stream on a thread, started at once, as fast as it yields; iterating hands the groups
    on in order.

    Records a ``decode`` span per group (from the previous group's completion, or the start, to this one's) and a
    ``transfer`` instant when the consumer (``prefetch``'s thread) takes a group to copy it. Errors of the stream
    are raised to the consumer. :meth:`close` (idempotent) stops the thread and closes the stream.
    """

    def __init__(self, stream: Iterable[Frames], *, group_frames: int, timeline: Timeline):
        self._stream = stream
        self._group_frames = group_frames
        self._timeline = timeline
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._handed = 0
        self._done = False
        self._thread = threading.Thread(target=self._drain, name="qv-jax-decode-ahead", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        source = iter(self._stream)
        last = self._timeline.now()
        try:
            for g, group in enumerate(source):
                if self._stop.is_set():
                    return
                group = pad_group(group, self._group_frames)
                # recorded before the group is handed on, so its decode event precedes any event of its encoding
                last = self._timeline.record("decode", g, last).end
                self._ready.put(group)
            self._ready.put(_END)
        except BaseException as e:  # every failure, KeyboardInterrupt included, goes to the consumer
            self._ready.put(_Failure(e))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[Frames]:
        return self

    def __next__(self) -> Frames:
        if self._done:
            raise StopIteration
        item = self._ready.get()
        if item is _END or isinstance(item, _Failure):
            self._done = True
            if item is _END:
                raise StopIteration
            raise item.error
        now = self._timeline.now()
        self._timeline.record("transfer", self._handed, now, now)
        self._handed += 1
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def run_overlapped(
    stream: Iterable[Frames],
    step: Callable[[State, int, Frames], State],
    *,
    group_frames: int,
    timeline: Timeline,
    initial: Callable[[], State] | None = None,
    depth: int = 2,
    device=None,
) -> tuple[State | None, int]:
    """Fold ``state = step(state, g, group)`` over the groups of ``stream`` with decoding and transfers overlapped;
    returns the final state and the number of groups.

    ``group.frames`` reaches ``step`` as a device array (on ``device``) of ``group_frames`` frames. ``step`` must
    block until its device work is done (it records its own spans), so the ``wait`` spans measure how long the
    device loop was starved of frames. ``initial()`` makes the first state once decoding has started, before the
    first group is awaited (the prompt prefix prefills while the decoders start up); without it the state starts
    as ``None``.
    """
    import jax

    ahead = DecodeAhead(stream, group_frames=group_frames, timeline=timeline)
    groups = prefetch(ahead, depth=depth, device=device)
    count = 0
    try:
        state = None if initial is None else initial()
        while True:
            start = timeline.now()
            group = next(groups, None)
            if group is None:
                return state, count
            jax.block_until_ready(group.frames)
            timeline.record("wait", count, start)
            state = step(state, count, group)
            count += 1
    finally:
        groups.close()
        ahead.close()
