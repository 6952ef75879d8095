"""Live progress of ``ask``, ``encode`` and ``demo`` on stderr: one line per stage (decode, vision, prefill,
answer), each frozen with its own time and rate the moment its stage ends, and ``compiling`` while XLA compiles a
step. Drawn only on a terminal. See docs/guide.md (Command line)."""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time

# What each stage's line counts; stages draw top to bottom in this order, which is also the order they end in
# (a group is encoded after it is decoded, prefilled after it is encoded, and the answer comes last).
UNITS = {"decode": "frame", "vision": "group", "prefill": "group", "answer": "question"}
TICK_S = 0.5  # how often the open lines are redrawn when nothing happens (elapsed time keeps moving)
# jax.monitoring events: the scalar one is recorded when tracing or an XLA compile starts (jax's
# log_elapsed_time), the duration one when a compile ends.
COMPILE_STARTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")
COMPILE_ENDS = ("/jax/core/compile/backend_compile_duration",)
_UP, _CLEAR = "\x1b[{}A", "\x1b[K"


@dataclasses.dataclass
class _Line:
    stage: str
    total: int
    n: int = 0
    busy: float = 0.0  # seconds of the stage's spans: its rate is the timing table's, not diluted by waits
    started: float | None = None
    ended: float | None = None
    compiling: bool = False

    def text(self, width: int, now: float) -> str:
        from tqdm import tqdm

        elapsed = 0.0 if self.started is None else (self.ended or now) - self.started
        rate = self.n / self.busy if self.n and self.busy > 0 else None
        note = "compiling" if self.compiling else None
        prefix = self.stage.ljust(max(map(len, UNITS)))
        return tqdm.format_meter(
            self.n, self.total, elapsed, ncols=width, prefix=prefix, unit=UNITS[self.stage], rate=rate, postfix=note
        )


class StageBars:
    """Progress lines for the stages in ``totals`` (stage -> frames, groups or questions to count), fed as the
    ``progress`` of ``VideoQA.ask`` / ``encode``: called with each finished stage span, and told through
    :meth:`started` when a span begins.

    Draws on ``file`` (default stderr) only when it is a terminal and ``enabled``. Use as a context manager.
    ``group_frames`` turns a decoded group into frames (the last group may be short), ``per_answer`` an answer
    span into questions (``ask_many`` answers all its questions in one pass).
    """

    def __init__(
        self, totals: dict[str, int], *, group_frames: int = 1, per_answer: int = 1, enabled: bool = True, file=None
    ):
        self.file = sys.stderr if file is None else file
        self.enabled = enabled and _is_terminal(self.file)
        self.group_frames = group_frames
        self.per_answer = per_answer
        self._lines = {stage: _Line(stage, total) for stage, total in totals.items() if stage in UNITS}
        self._open = sorted(self._lines.values(), key=lambda line: list(UNITS).index(line.stage))
        self._drawn = 0  # open lines on screen, above the cursor
        self._running: dict[int, _Line] = {}  # thread -> the line whose step runs on it (compiles are per thread)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="qv-jax-progress", daemon=True)

    # ---- what the pipeline tells ---------------------------------------------------------------------------

    def started(self, stage: str, group: int) -> None:
        line = self._lines.get(stage)
        if line is None or not self.enabled:
            return
        with self._lock:
            if line.started is None:
                line.started = time.perf_counter()
            self._running[threading.get_ident()] = line
            self._draw()

    def __call__(self, event) -> None:
        line = self._lines.get(event.stage)
        if line is None or not self.enabled:
            return
        with self._lock:
            if self._running.get(threading.get_ident()) is line:
                del self._running[threading.get_ident()]
            line.compiling = False
            line.busy += event.seconds
            if line.started is None:  # decode spans are recorded when they end; the first began at the start
                line.started = time.perf_counter() - event.seconds
            if event.stage == "decode":
                line.n = min(line.total, line.n + self.group_frames)
            elif event.stage == "answer":
                line.n = min(line.total, line.n + self.per_answer)
            elif event.group >= 0:  # group -1 of prefill: the prompt prefix
                line.n += 1
            if line.n >= line.total and line.ended is None:
                line.ended = time.perf_counter()
            self._draw()

    def _set_compiling(self, compiling: bool) -> None:
        line = self._running.get(threading.get_ident())
        if line is None:
            return
        with self._lock:
            if line.compiling != compiling:
                line.compiling = compiling
                self._draw()

    def _compile_start(self, event: str, value, **kwargs) -> None:
        if event in COMPILE_STARTS:
            self._set_compiling(True)

    def _compile_end(self, event: str, seconds, **kwargs) -> None:
        if event in COMPILE_ENDS:
            self._set_compiling(False)

    # ---- drawing ---------------------------------------------------------------------------------------------

    def _draw(self, final: bool = False) -> None:
        """Redraw the open lines in place; lines whose stage ended are drawn once more and left above."""
        width = _columns(self.file)
        now = time.perf_counter()
        text = ("\r" + _UP.format(self._drawn)) if self._drawn else ""
        text += "".join(line.text(width - 1, now) + _CLEAR + "\n" for line in self._open)
        while self._open and (final or self._open[0].ended is not None):
            self._open.pop(0)
        self._drawn = len(self._open)
        self.file.write(text)
        self.file.flush()

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            with self._lock:
                if self._open:
                    self._draw()

    def __enter__(self) -> StageBars:
        if self.enabled:
            import jax

            jax.monitoring.register_scalar_listener(self._compile_start)
            jax.monitoring.register_event_duration_secs_listener(self._compile_end)
            with self._lock:
                self._draw()
            self._ticker.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        import jax

        self._stop.set()
        self._ticker.join()
        jax.monitoring.unregister_scalar_listener(self._compile_start)
        jax.monitoring.unregister_event_duration_listener(self._compile_end)
        with self._lock:
            for line in self._open:
                line.compiling = False
            if self._open:
                self._draw(final=True)


def _is_terminal(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _columns(file) -> int:
    try:
        columns = os.get_terminal_size(file.fileno()).columns
    except (AttributeError, ValueError, OSError):
        columns = 0
    return columns or 80  # a terminal that reports no size (a fresh pseudo-terminal) gets the usual width


def stage_bars(plans, *, answers: int = 1, per_answer: int = 1, enabled: bool = True) -> StageBars:
    """Stage lines for a run: decode, vision and prefill sized from ``plans`` (the ``(FramePlan, GroupPlan)`` of
    a video file; ``None`` for a saved memory, which is only loaded), and an answer line counting ``answers``
    questions, ``per_answer`` of them in each answer span."""
    totals, group_frames = {}, 1
    if plans is not None:
        frame_plan, plan = plans
        totals = {"decode": frame_plan.num_frames, "vision": plan.num_groups, "prefill": plan.num_groups}
        group_frames = plan.group_frames
    if answers:
        totals["answer"] = answers
    return StageBars(totals, group_frames=group_frames, per_answer=per_answer, enabled=enabled)
