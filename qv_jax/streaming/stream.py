"""VideoStream: a live video watched patch by patch into a bounded memory of semantic carriers, asked at any time.

Made by :meth:`qv_jax.VideoQA.stream`. Frames are sampled to ``fps`` by their times, paired into temporal patches
and each patch runs one jitted step (``qv_jax.streaming.step``); :meth:`VideoStream.ask` answers over a copy of the
memory while the stream goes on. See docs/streaming.md.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from qv_jax.answer import Answer
from qv_jax.cache.layered import LayeredKV
from qv_jax.errors import ConfigError, InputError
from qv_jax.model.rope_index import text_position_block, vision_position_block
from qv_jax.model.tokenizer import DEFAULT_SYSTEM_PROMPT
from qv_jax.numeric import round_up
from qv_jax.pipeline import prefill
from qv_jax.pipeline.executor import Timeline
from qv_jax.pipeline.prefill import TextChunk
from qv_jax.runtime.generate import answer_request
from qv_jax.streaming.step import Bank, StepInfo, rebase, stream_step

__all__ = ["FeedReport", "StreamConfig", "VideoStream"]

QUESTION_BUCKET = 32
CAPACITY_BUCKET = 128
# positions left free past the newest patch for a question and its answer; nearer the model's range, the bank is
# moved back (rebase)
POSITION_RESERVE = 2048
# per-patch timings kept (the latest)
STEP_TIMES_KEPT = 10_000
# first entries of the growing memory of carriers=None, which doubles when full (one compiled step per size)
GROW_ENTRIES = 16


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """How a :class:`VideoStream` keeps its memory.

    Args:
      carriers: bank entries (one carrier per temporal patch); ``None``: no carriers, every visual token kept and
        the memory grows (for checking the incremental machinery, not for live streams; needs ``keep_visual="all"``).
      keep_visual: visual tokens of each patch kept beside its carrier: an integer ``k`` (those the carrier attends
        to most, per layer) or ``"all"``.
      fps: frames taken per second of stream time (one per ``1/fps`` slot, the first to arrive in it).
    """

    carriers: int | None = 64
    keep_visual: int | str = 0
    fps: float = 1.0

    def __post_init__(self):
        if self.carriers is not None and (not isinstance(self.carriers, int) or self.carriers < 2):
            raise ConfigError(f"carriers must be an integer >= 2 or None, got {self.carriers!r}")
        if self.keep_visual != "all" and (not isinstance(self.keep_visual, int) or self.keep_visual < 0):
            raise ConfigError(f"keep_visual must be a non-negative integer or 'all', got {self.keep_visual!r}")
        if self.carriers is None and self.keep_visual != "all":
            raise ConfigError("carriers=None keeps no carrier to rank visual tokens by: use keep_visual='all'")
        if not isinstance(self.fps, int | float) or not 0 < self.fps < math.inf:
            raise ConfigError(f"fps must be positive and finite, got {self.fps!r}")


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What the first frames fix for the stream's life: frame size, tokens per patch, slots per entry."""

    height: int
    width: int
    grid_hw: tuple[int, int]  # merged tokens per patch, rows x columns
    visual: int
    unit: int


@dataclasses.dataclass(frozen=True)
class FeedReport:
    """How a :meth:`VideoStream.feed` went: frames the stream took, frames the source dropped, the stream time
    covered and the wall time it took, and how the source ended (``ended``, ``message``)."""

    frames_seen: int
    frames_dropped: int
    stream_s: float
    wall_s: float
    ended: str
    message: str

    @property
    def realtime_factor(self) -> float:
        """Stream seconds watched per wall second (above 1: faster than real time)."""
        return self.stream_s / self.wall_s if self.wall_s > 0 else math.inf


class VideoStream:
    """A live stream's memory: :meth:`push` frames as they arrive, :meth:`ask` at any moment (thread-safe)."""

    def __init__(self, model, config: StreamConfig, *, system_prompt: str = DEFAULT_SYSTEM_PROMPT):
        if model.tokenizer is None:
            raise ConfigError(f"model {model.source or ''} has no tokenizer; a stream needs tokenizer.json")
        if model.sparsity is not None:
            # a sparse answer would read the whole bounded bank anyway, and the bank's slots are not in stream
            # order, which a streaming head's recent-token window assumes (docs/streaming.md, "Answers")
            raise ConfigError(
                "a stream answers with dense attention over its bank of at most prefix + carriers * (keep_visual "
                "+ 1) tokens, in slots that are not in stream order: load the model without sparsity= to stream"
            )
        self.model = model
        self.config = config
        self._lock = threading.Lock()
        self._timeline = Timeline()
        tokenizer = self.model.tokenizer
        self._prefix = tokenizer.video_prompt("", (2, 2, 2), system=system_prompt).prefix
        text = self.model.config.text
        self._max_positions = text.max_position_embeddings
        self._bank: Bank | None = None
        self._layout: _Layout | None = None
        self._pending: list[tuple[np.ndarray, float]] = []
        self._next_slot = 0
        self._patches = 0
        self._text_start = self._prefix.size
        self._times: dict[int, float] = {}
        self._seen_s = 0.0  # stream time of the newest frame in the memory
        self.frames_seen = 0
        self.frames_skipped = 0
        self._shift = 0  # temporal positions the bank was moved back by (rebases)
        self.rebases = 0
        self.last_step: StepInfo | None = None
        # seconds of each recent patch (vision + step), bounded like everything else the stream keeps
        self.step_seconds: collections.deque[float] = collections.deque(maxlen=STEP_TIMES_KEPT)

    # ---- state --------------------------------------------------------------------------------------------------

    @property
    def patches(self) -> int:
        """Temporal patches prefilled so far."""
        return self._patches

    @property
    def kv_bytes(self) -> int:
        """Bytes of the keys and values the memory holds (system prompt + bank, all layers)."""
        with self._lock:
            if self._bank is None:
                return 0
            return self._bank.kv.kv_bytes

    @property
    def carrier_times_s(self) -> np.ndarray:
        """Stream times (s) of the patches the bank holds, in stream order."""
        with self._lock:
            if self._bank is None:
                return np.zeros(0)
            patches = np.sort(np.asarray(jax.device_get(self._bank.patch)))
            return np.asarray([self._times[int(p)] for p in patches if p >= 0])

    # ---- frames in ----------------------------------------------------------------------------------------------

    def push(self, frames, times_s=None) -> int:
        """Take uint8 frames ``[n, H, W, 3]`` at stream times ``times_s`` (seconds, default: right after the last
        one at ``fps``); returns the patches prefilled. Frames are sampled to ``fps``: one per ``1/fps`` slot of
        stream time, the first that arrives in it; the others count as :attr:`frames_skipped`."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise InputError(f"frames must be uint8 [n, H, W, 3], got {frames.dtype} {frames.shape}")
        if times_s is None:
            times_s = (self._next_slot + np.arange(len(frames))) / self.config.fps
        times_s = np.asarray(times_s, np.float64).reshape(-1)
        if times_s.size != len(frames):
            raise InputError(f"{len(frames)} frames but {times_s.size} times")
        done = 0
        for frame, t in zip(frames, times_s, strict=True):
            slot = math.floor(t * self.config.fps + 1e-6)
            if slot < self._next_slot:
                self.frames_skipped += 1
                continue
            self._next_slot = slot + 1
            self.frames_seen += 1
            self._pending.append((frame, float(t)))
            if len(self._pending) == self.model.config.vision.temporal_patch_size:
                self._run_patch()
                done += 1
        return done

    def feed(self, source, *, after_frame=None) -> FeedReport:
        """Watch a :class:`~qv_jax.video.live.LiveSource` until it ends, stalls, breaks or is closed; returns a
        :class:`FeedReport`. The source samples to this stream's ``fps``; its times continue this stream's.
        ``after_frame(time_s)`` is called after each frame (e.g. to ask on a schedule)."""
        source.fps = self.config.fps
        offset = self._next_slot / self.config.fps
        seen, began, last = self.frames_seen, time.perf_counter(), 0.0
        try:
            for frame, t in source:
                last = t
                self.push(frame[None], [offset + t])
                if after_frame is not None:
                    after_frame(offset + t)
        finally:
            source.close()
        wall = time.perf_counter() - began
        covered = last + 1 / self.config.fps if self.frames_seen > seen else 0.0
        return FeedReport(self.frames_seen - seen, source.dropped, covered, wall, source.ended, source.message)

    def _run_patch(self) -> None:
        frames = np.stack([f for f, _ in self._pending])
        start_s, end_s = self._pending[0][1], self._pending[-1][1]
        self._pending = []
        with self._lock:
            if self._layout is None:
                self._start(frames.shape[1], frames.shape[2])
            layout = self._layout
            if frames.shape[1:3] != (layout.height, layout.width):
                raise InputError(
                    f"frames of {frames.shape[2]}x{frames.shape[1]} in a stream of {layout.width}x{layout.height}"
                )
            began = time.perf_counter()
            m, c = self.model, self.config
            embeds = m.encode_video(frames)
            if c.carriers is None and int(self._bank.count) == self._bank.entries:
                self._bank = _grown(self._bank, self._prefix.size, layout.unit)
            positions, text_start = self._positions(self._patches)
            if text_start + POSITION_RESERVE > self._max_positions:
                self._rebase(text_start + POSITION_RESERVE - self._max_positions)
                positions, text_start = self._positions(self._patches)
            first_index = self._token_index(self._patches)
            with m.mesh_context():
                self._bank, self.last_step = stream_step(
                    m.graphdef,
                    m.state,
                    self._bank,
                    embeds,
                    positions,
                    jnp.int32(first_index),
                    jnp.int32(self._patches),
                    carrier=c.carriers is not None,
                    keep=None if c.keep_visual == "all" else c.keep_visual,
                    evict=c.carriers is not None,
                    prefix=self._prefix.size,
                )
            jax.block_until_ready(self._bank.count)
            self.step_seconds.append(time.perf_counter() - began)
            self._times[self._patches] = start_s
            self._seen_s = end_s
            self._patches += 1
            self._text_start = text_start
            self._forget_times()

    def _forget_times(self) -> None:
        if len(self._times) > 4 * self._bank.entries:
            held = set(int(p) for p in np.asarray(jax.device_get(self._bank.patch)))
            self._times = {p: t for p, t in self._times.items() if p in held}

    def _start(self, height: int, width: int) -> None:
        """Fix the layout from the first frames and prefill the system prompt into an empty bank."""
        m, c = self.model, self.config
        vision = m.config.vision
        unit_px = vision.patch_size * vision.spatial_merge_size
        if height % unit_px or width % unit_px:
            raise InputError(
                f"stream frames must have sides that are multiples of {unit_px}, got {width}x{height} "
                "(live sources resize them; see qv_jax.video.live)"
            )
        grid_hw = (height // unit_px, width // unit_px)
        visual = grid_hw[0] * grid_hw[1]
        carrier = c.carriers is not None
        unit = (visual + carrier) if c.keep_visual == "all" else min(c.keep_visual, visual) + 1
        if c.keep_visual != "all" and c.keep_visual > visual:
            raise ConfigError(f"keep_visual={c.keep_visual} exceeds the {visual} visual tokens of a patch")
        self._layout = _Layout(height, width, grid_hw, visual, unit)
        entries = GROW_ENTRIES if c.carriers is None else c.carriers
        self._bank = self._empty_bank(entries, unit)

    def _empty_bank(self, entries: int, unit: int) -> Bank:
        m = self.model
        t = m.config.text
        prefix = self._prefix.size
        # at least one chunk of slots: a chunk attends to the bank through a call that takes no more queries than
        # keys (the slots past the entries stay empty, unseen and uncounted)
        chunk = self._layout.visual + (self.config.carriers is not None)
        kv = m.make_cache(
            LayeredKV.create,
            num_layers=t.num_layers,
            capacity=max(prefix + entries * unit, chunk),
            num_kv_heads=t.num_kv_heads,
            head_dim=t.head_dim,
            dtype=m.dtype,
        )
        chunk = TextChunk(
            ids=self._prefix,
            positions=text_position_block(prefix, 0),
            token_index=np.arange(prefix, dtype=np.int32),
            valid=np.ones(prefix, bool),
        )
        with m.mesh_context():
            _, kv = prefill.prefill_text(m.graphdef, m.state, kv, chunk)
        return Bank(
            kv=kv,
            emb=jnp.zeros((entries, t.hidden_size), jnp.float32),
            patch=jnp.full((entries,), -1, jnp.int32),
            count=jnp.int32(0),
        )

    def _temporal(self, patch: int) -> int:
        """Temporal position offset of patch ``patch`` in the stream (before any rebase): Qwen's
        ``trunc(i · second_per_grid_t · tokens_per_second)`` in float32, or the index itself for Qwen2-VL."""
        tps = self.model.config.rope_tokens_per_second
        if tps is None:
            return patch
        spg = self.model.config.vision.temporal_patch_size / self.config.fps
        return int((np.float32(patch) * np.float32(spg)) * np.float32(tps))

    def _rebase(self, needed: int) -> None:
        """Move the bank at least ``needed`` temporal positions back: the oldest held carrier to the start of the
        video, dropping the oldest carriers while that is not enough (docs/streaming.md, "Positions")."""
        held = sorted(int(p) for p in np.asarray(jax.device_get(self._bank.patch)) if p >= 0)
        kept = [p for p in held if self._temporal(p) - self._shift >= needed]
        shift = self._temporal(kept[0] if kept else self._patches) - self._shift
        drop = kept[0] if kept else self._patches
        m = self.model
        with m.mesh_context():
            self._bank = rebase(
                m.graphdef,
                m.state,
                self._bank,
                jnp.int32(shift),
                jnp.int32(drop),
                prefix=self._prefix.size,
                unit=self._layout.unit,
            )
        self._shift += shift
        self.rebases += 1

    def _token_index(self, patch: int) -> int:
        """Prompt token index of the first token of patch ``patch``'s chunk (or of what follows the last patch)."""
        return self._prefix.size + patch * (self._layout.visual + (self.config.carriers is not None))

    def _positions(self, patch: int) -> tuple[np.ndarray, int]:
        """M-RoPE positions ``[3, T]`` of patch ``patch``'s chunk and where text after it would start.

        The visual tokens sit where one whole-stream video block would put them (``vision_position_block``: the
        temporal row advances with stream time); the carrier takes its patch's temporal position and the centre of
        its grid.
        """
        layout, prefix = self._layout, self._prefix.size
        vision = self.model.config.vision
        t_offset = self._temporal(patch) - self._shift
        rows, cols = layout.grid_hw
        merge = vision.spatial_merge_size
        block = vision_position_block((1, rows * merge, cols * merge), prefix, spatial_merge_size=merge)
        block[0] += t_offset
        if self.config.carriers is not None:
            centre = np.array([[prefix + t_offset], [prefix + (rows - 1) // 2], [prefix + (cols - 1) // 2]], np.int32)
            block = np.concatenate([block, centre], axis=1)
        return block, int(block.max()) + 1

    # ---- questions ----------------------------------------------------------------------------------------------

    def ask(
        self,
        question: str,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ):
        """Answer ``question`` about what the stream has shown so far (an :class:`~qv_jax.videoqa.Answer` whose
        ``stream_time_s`` is the time of the newest frame in the memory it was answered from).

        Safe to call from another thread while frames are pushed: the memory is copied under the stream's lock
        and the answer decodes over the copy. Frames waiting for their patch's second frame are not yet seen.
        """
        if not isinstance(question, str):
            raise InputError(f"question must be a string, got {type(question).__name__}")
        m = self.model
        decode = answer_request(
            m, max_new_tokens, do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        )
        suffix = m.tokenizer.question_suffix(question)
        length = round_up(suffix.size, QUESTION_BUCKET)
        timeline = Timeline()
        with timeline.span("answer"):
            with self._lock:
                if self._bank is None:
                    raise InputError("the stream has shown no complete temporal patch (two frames) yet")
                kv = self._bank.kv
                slots = int(jax.device_get(kv.lengths).max()) + length + max_new_tokens
                cache = kv.padded(round_up(max(slots, kv.capacity), CAPACITY_BUCKET))
                text_start, index = self._text_start, self._token_index(self._patches)
                seen_s = self._seen_s
            chunk = TextChunk(
                ids=np.pad(suffix, (0, length - suffix.size)),
                positions=text_position_block(length, text_start),
                token_index=index + np.arange(length, dtype=np.int32),
                valid=np.arange(length) < suffix.size,
            )
            where = (text_start + suffix.size, index + suffix.size)
            token_ids, kv_bytes = prefill.answer(m, cache, chunk, where, decode)
        return Answer(m.tokenizer.decode(token_ids), token_ids, timeline.timings(), kv_bytes, stream_time_s=seen_s)


def _grown(bank: Bank, prefix: int, unit: int) -> Bank:
    """The bank with twice the entries (carriers=None: every token is kept)."""
    extra = bank.entries
    kv = bank.kv.padded(prefix + 2 * extra * unit)
    return Bank(
        kv=kv,
        emb=jnp.pad(bank.emb, ((0, extra), (0, 0))),
        patch=jnp.pad(bank.patch, (0, extra), constant_values=-1),
        count=bank.count,
    )
