"""Live frame sources: a file (at its own frame rate or as fast as it decodes), a byte stream on a pipe or standard
input (MPEG-TS, Matroska) decoded incrementally with PyAV, or a Python iterator of frames.

A source decodes on its own thread into a bounded buffer of ``buffer`` frames, taking at most one frame per
``1/fps`` slot of stream time. Rule for frames that arrive faster than the model takes them: when the buffer is
full the oldest waiting frame is dropped (counted in :attr:`LiveSource.dropped`), so the model always works on the
newest frames and nothing queues without bound. Iterating yields ``(frame uint8 [H, W, 3], time_s)`` until the
stream ends, stalls (no frame for ``stall_timeout_s``) or breaks; :attr:`LiveSource.ended` and
:attr:`LiveSource.message` say which. No JAX here. See docs/streaming.md.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from qv_jax.errors import InputError
from qv_jax.video.sampling import IMAGE_FACTOR, VIDEO_MIN_PIXELS, smart_resize

__all__ = ["LiveSource", "file_source", "frames_source", "pipe_source"]

# Default frame budget of a live source: 448x448 (256 merged tokens per temporal patch).
LIVE_MAX_PIXELS = 448 * 448

# Demuxer options of a piped stream: start decoding as soon as a frame's bytes are in.
LIVE_DEMUX_OPTIONS = {"probesize": "32768", "analyzeduration": "0"}

Producer = Callable[[], Iterator[tuple[np.ndarray, float]]]


class LiveSource:
    """Frames from a producer (``(frame, time_s)`` pairs, decoded on a thread), sampled to ``fps`` and buffered.

    Counters: :attr:`decoded` frames produced, :attr:`taken` frames sampled into the buffer, :attr:`dropped`
    frames pushed out of the full buffer. After iteration, :attr:`ended` is ``"end"``, ``"stalled"``, ``"broken"``
    or ``"closed"`` and :attr:`message` says what happened in one line.
    """

    def __init__(self, produce: Producer, name: str, *, buffer: int = 4, stall_timeout_s: float = 10.0):
        if buffer < 2:
            raise InputError(f"a live source needs a buffer of at least 2 frames (one temporal patch), got {buffer}")
        self.name = name
        self.fps: float | None = None
        self.decoded = self.taken = self.dropped = 0
        self.ended: str | None = None
        self.message = ""
        self._produce = produce
        self._frames: collections.deque = collections.deque()
        self._buffer = buffer
        self._stall = stall_timeout_s
        self._ready = threading.Condition()
        self._finished: tuple[str, str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_slot = 0

    def _run(self) -> None:
        last = None
        try:
            for frame, t in self._produce():
                last = t
                if self._stop.is_set():
                    outcome = ("closed", f"{self.name}: closed")
                    break
                self.decoded += 1
                if self.fps is not None:
                    slot = math.floor(t * self.fps + 1e-6)
                    if slot < self._next_slot:
                        continue
                    self._next_slot = slot + 1
                with self._ready:
                    if len(self._frames) == self._buffer:
                        self._frames.popleft()
                        self.dropped += 1
                    self._frames.append((frame, t))
                    self.taken += 1
                    self._ready.notify()
            else:
                # a live stream cut off mid-way reads as its end (neither MPEG-TS nor Matroska marks the end of a
                # live stream): how much came says whether that was early
                seen = "no frame" if last is None else f"{self.decoded} frame{'s' * (self.decoded != 1)}, {last:.1f} s"
                outcome = ("end", f"{self.name}: the stream ended after {seen}")
        except Exception as e:  # a damaged or cut stream: reported to the consumer, who keeps what it saw
            outcome = ("broken", f"{self.name}: the stream broke ({type(e).__name__}: {e})")
        with self._ready:
            self._finished = outcome
            self._ready.notify()

    def __iter__(self) -> Iterator[tuple[np.ndarray, float]]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"qv-jax-live-{self.name}", daemon=True)
            self._thread.start()
        while True:
            with self._ready:
                waited = self._ready.wait_for(
                    lambda: self._frames or self._finished or self._stop.is_set(), timeout=self._stall
                )
                if self._stop.is_set():  # closed (from another thread): frames still waiting are left
                    return
                if self._frames:
                    item = self._frames.popleft()
                elif not waited:
                    self._end("stalled", f"{self.name}: the stream stalled (no frame for {self._stall:g} s)")
                    return
                else:
                    self._end(*self._finished)
                    return
            yield item

    def _end(self, how: str, message: str) -> None:
        self.ended, self.message = how, message
        self._stop.set()

    def close(self, reason: str = "closed") -> None:
        """Stop taking frames, from any thread: iteration ends at once (a producer blocked in a read is left to its
        daemon thread). ``reason`` goes into :attr:`message` unless the stream had already ended."""
        with self._ready:
            if self.ended is None:
                self.ended, self.message = "closed", f"{self.name}: {reason}"
            self._stop.set()
            self._ready.notify_all()


def _resizer(size: tuple[int, int] | None, max_pixels: int):
    """The output size of frames: ``size`` (height, width), or Qwen's smart resize of the first frame."""
    chosen: list[tuple[int, int]] = [] if size is None else [tuple(size)]

    def target(height: int, width: int) -> tuple[int, int]:
        if not chosen:
            low = min(VIDEO_MIN_PIXELS, max_pixels)
            chosen.append(smart_resize(height, width, factor=IMAGE_FACTOR, min_pixels=low, max_pixels=max_pixels))
        return chosen[0]

    return target


def _decode(open_container: Callable, size, max_pixels: int, realtime: bool, low_delay: bool = False) -> Producer:
    """A producer decoding the first video stream of ``open_container()`` with PyAV, frames resized to one size and
    timed from the first frame; with ``realtime`` each frame is held back until its time has come."""

    def produce() -> Iterator[tuple[np.ndarray, float]]:
        import av

        target = _resizer(size, max_pixels)
        with open_container(av) as container:
            stream = container.streams.video[0]
            if low_delay:  # frame threading holds frames back by the thread count: one frame out per frame in
                stream.thread_type = "NONE"
            first, began, count = None, time.perf_counter(), 0
            for frame in container.decode(stream):
                stamp = frame.time
                if stamp is None:  # no timestamps: count at the stream's nominal rate
                    stamp = count / float(stream.average_rate or 25)
                first = stamp if first is None else first
                t = stamp - first
                count += 1
                if realtime:
                    time.sleep(max(0.0, began + t - time.perf_counter()))
                height, width = target(frame.height, frame.width)
                yield frame.to_ndarray(width=width, height=height, format="rgb24"), t

    return produce


def file_source(
    path: str | os.PathLike,
    *,
    realtime: bool = False,
    size: tuple[int, int] | None = None,
    max_pixels: int = LIVE_MAX_PIXELS,
    buffer: int = 4,
    stall_timeout_s: float = 10.0,
) -> LiveSource:
    """A video file played at its own frame rate (``realtime=True``) or as fast as it decodes."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such video file")
    produce = _decode(lambda av: av.open(str(path)), size, max_pixels, realtime)
    return LiveSource(produce, str(path), buffer=buffer, stall_timeout_s=stall_timeout_s)


def pipe_source(
    stream: BinaryIO,
    *,
    format: str | None = "mpegts",
    name: str = "standard input",
    size: tuple[int, int] | None = None,
    max_pixels: int = LIVE_MAX_PIXELS,
    buffer: int = 4,
    stall_timeout_s: float = 10.0,
) -> LiveSource:
    """A byte stream (a pipe, ``sys.stdin.buffer``) in ``format`` (``"mpegts"``, ``"matroska"``; ``None``:
    probed), decoded as the bytes arrive, e.g. ``ffmpeg -i CAMERA -f mpegts - | qv-jax watch - ...``."""

    def open_container(av):
        # probe as few bytes as a live feed allows, or the first frames wait for megabytes of stream
        return av.open(_Available(stream), mode="r", format=format, options=LIVE_DEMUX_OPTIONS)

    produce = _decode(open_container, size, max_pixels, realtime=False, low_delay=True)
    return LiveSource(produce, name, buffer=buffer, stall_timeout_s=stall_timeout_s)


class _Available:
    """A binary stream whose ``read(n)`` returns the bytes that have arrived (``read1``) instead of waiting for
    ``n`` of them, as a buffered pipe would: a live feed's frames decode as they come."""

    def __init__(self, stream: BinaryIO):
        self._read = getattr(stream, "read1", stream.read)

    def read(self, n: int = -1) -> bytes:
        return self._read(n if n > 0 else 1 << 16)


def frames_source(
    frames: Iterable, *, fps: float | None = None, name: str = "frames", buffer: int = 4, stall_timeout_s=10.0
) -> LiveSource:
    """A Python iterable of uint8 frames ``[H, W, 3]`` at ``fps``, or of ``(frame, time_s)`` pairs when ``fps`` is
    None."""

    def produce() -> Iterator[tuple[np.ndarray, float]]:
        for i, item in enumerate(frames):
            frame, t = (item, i / fps) if fps is not None else item
            yield np.asarray(frame), float(t)

    return LiveSource(produce, name, buffer=buffer, stall_timeout_s=stall_timeout_s)
