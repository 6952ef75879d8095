"""VideoQA: answer questions about a long video — parallel decoding, group-wise pruned prefill, overlap.

``ask(video, question)`` plans frames and tokens from a probe, decodes keyframe intervals on the QuickDecoder pool
while the device encodes and prefills earlier groups over the pruned memory of the groups before them, then
appends the question behind the memory and generates. ``encode(video)`` stops after the prefill and returns a
reusable :class:`~qv_jax.memory.VideoMemory`. See docs/videoqa.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qv_jax.answer import Answer
from qv_jax.attention.backends import AttentionConfig
from qv_jax.cache.dense import KVCache
from qv_jax.cache.layered import LayeredKV
from qv_jax.cache.sparse import SparseKVCache
from qv_jax.errors import ConfigError, InputError
from qv_jax.memory import MemoryInfo, ModelFingerprint, VideoMemory, is_memory_dir
from qv_jax.model.tokenizer import DEFAULT_SYSTEM_PROMPT
from qv_jax.numeric import round_up
from qv_jax.pipeline import prefill
from qv_jax.pipeline.executor import StageEvent, Timeline, run_overlapped
from qv_jax.pipeline.plan import GroupPlan, PruneRule, check_settings
from qv_jax.pipeline.prefill import TextChunk, text_after_video
from qv_jax.pipeline.questions import questions_answer
from qv_jax.runtime import encode, sparse
from qv_jax.runtime.generate import DecodeRequest, answer_request, decode_answer
from qv_jax.runtime.vlm import VisionLanguageModel, load_model
from qv_jax.streaming.stream import StreamConfig, VideoStream
from qv_jax.video.plan import FramePlan
from qv_jax.video.reader import Frames, VideoReader
from qv_jax.video.sampling import VIDEO_MIN_PIXELS

__all__ = ["Answer", "VideoQA", "VideoQAConfig"]

# Question chunks are padded to a multiple of this many tokens, cache capacities to a multiple of CAPACITY_BUCKET,
# so questions of similar length reuse compiled steps.
QUESTION_BUCKET = 32
CAPACITY_BUCKET = 128


@dataclasses.dataclass(frozen=True)
class VideoQAConfig:
    """How :class:`VideoQA` samples frames and prunes them; the keywords of ``VideoQA`` and of the CLI.

    Args:
      group_frames: frames per prefill group (a multiple of the temporal patch size, 2).
      retention: fraction ``ρ`` of each group's tokens every layer keeps, in (0, 1].
      prune: score rule (``qv_jax.pipeline.plan.PruneRule``): ``key_norms_small`` (default), ``key_norms``,
        ``value_norms``, ``random``, ``question_attention`` (needs the question up front, so no reusable memory)
        or ``none``.
      fps, max_frames: Qwen's frame sampling (``max_frames`` caps the count).
      max_pixels, min_pixels: per-frame pixel bounds of Qwen's ``smart_resize``; ``None`` uses Qwen's video budget
        (``min 128·28²``, ``max`` from the 128K-token total budget).
      layer_decay: optional per-layer decay of the retention, ``ρ_l = ρ · decay^l``.
      workers: decoder processes (default: CPU count).
      seed: seed of the ``random`` rule.
      system_prompt: the system turn of the chat prompt.
    """

    group_frames: int = 16
    retention: float = 0.5
    prune: str = PruneRule.KEY_NORMS_SMALL
    fps: float = 2.0
    max_frames: int = 768
    max_pixels: int | None = None
    min_pixels: int | None = None
    layer_decay: float | None = None
    workers: int | None = None
    seed: int = 0
    system_prompt: str = DEFAULT_SYSTEM_PROMPT

    def __post_init__(self):
        if not isinstance(self.fps, int | float) or not 0 < self.fps < math.inf:
            raise ConfigError(f"fps must be positive and finite, got {self.fps!r}")
        if not isinstance(self.max_frames, int) or self.max_frames < 2:
            raise ConfigError(f"max_frames must be an integer >= 2, got {self.max_frames!r}")
        for name in ("max_pixels", "min_pixels"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value!r}")
        object.__setattr__(self, "retention", float(self.retention))
        object.__setattr__(self, "fps", float(self.fps))

    def check(self, model: VisionLanguageModel) -> None:
        """Raise :class:`ConfigError` for settings ``model`` cannot run."""
        check_settings(
            model.config,
            group_frames=self.group_frames,
            retention=self.retention,
            prune=self.prune,
            layer_decay=self.layer_decay,
        )
        if model.sparsity is not None and self.layer_decay is not None:
            raise ConfigError(
                "layer_decay leaves layers with different token counts, which sparse decoding cannot take over; "
                "use layer_decay=None or a model without sparsity"
            )


@dataclasses.dataclass(frozen=True)
class _Question:
    """A question appended behind a memory: its text chunk (padded to the bucket) with ``length`` real tokens,
    the cache slots the answer needs, whether the memory's buffers may be reused in place, and how to decode."""

    chunk: TextChunk
    length: int
    slots: int
    consume: bool
    decode: DecodeRequest


class VideoQA:
    """Questions about videos with a Qwen2.5-VL / Qwen2-VL model, QuickVideo-style.

    ``VideoQA(model, config)`` or ``VideoQA(model, **settings)`` with the fields of :class:`VideoQAConfig`. The
    model needs a tokenizer. A model loaded with a sparsity config (``load_model(..., sparsity=)``) answers with
    sparse decoding: the pruned memory becomes its sparse decode state (``SparseKVCache.from_dense``), then the
    question and the answer run through ``qv_jax.runtime.sparse``.
    """

    def __init__(self, model: VisionLanguageModel, config: VideoQAConfig | None = None, **settings):
        if config is not None and settings:
            raise ConfigError(f"give a VideoQAConfig or its keywords, not both (got {', '.join(settings)})")
        config = VideoQAConfig(**settings) if config is None else config
        if model.tokenizer is None:
            raise ConfigError(
                f"model {model.source or ''} has no tokenizer; VideoQA needs tokenizer.json in the model directory"
            )
        config.check(model)
        self.model = model
        self.tokenizer = model.tokenizer
        self.config = config

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        group_frames: int = 16,
        retention: float = 0.5,
        prune: str = PruneRule.KEY_NORMS_SMALL,
        fps: float = 2.0,
        max_frames: int = 768,
        max_pixels: int | None = None,
        sparsity=None,
        *,
        dtype: str | None = None,
        mesh=None,
        config: VideoQAConfig | None = None,
        attention: AttentionConfig | str = "auto",
        attention_kernel: str | None = None,
        **options,
    ) -> VideoQA:
        """Load a model directory (HF or qv-jax checkpoint, with its tokenizer) and wrap it.

        ``dtype`` defaults to bfloat16 on GPU / TPU and float32 on CPU. The settings are ``config``, or the
        keywords here and in ``options`` (the other fields of :class:`VideoQAConfig`). With a ``mesh``
        (``qv_jax.make_mesh``, one process) the model is loaded into its shards and the memory is split by KV head
        like the model's caches. With ``sparsity`` (a :class:`~qv_jax.attention.SparsityConfig`) answers are
        decoded sparsely. ``attention`` / ``attention_kernel``: what runs the model's attention (``load_model``).
        """
        given = dict(
            group_frames=group_frames,
            retention=retention,
            prune=prune,
            fps=fps,
            max_frames=max_frames,
            max_pixels=max_pixels,
            **options,
        )
        if config is None:
            config = VideoQAConfig(**given)
        else:
            defaults = VideoQAConfig()
            changed = [name for name, value in given.items() if value != getattr(defaults, name)]
            if changed:
                raise ConfigError(f"give a VideoQAConfig or its keywords, not both (got {', '.join(changed)})")
        if dtype is None:
            dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        model = load_model(
            path, dtype, mesh=mesh, sparsity=sparsity, attention=attention, attention_kernel=attention_kernel
        )
        return cls(model, config)

    @functools.cached_property
    def fingerprint(self) -> ModelFingerprint:
        """What memories made here carry and memories used here must match (computed on first use)."""
        return ModelFingerprint.of(self.model.config, self.model.state)

    # ---- public API ---------------------------------------------------------------------------------------------

    def plan(self, video: str | os.PathLike) -> tuple[FramePlan, GroupPlan]:
        """The frame plan and the group plan of ``video``, from a probe alone (nothing is decoded)."""
        with VideoReader(video, workers=self.config.workers) as reader:
            frame_plan = self._frame_plan(reader)
        return frame_plan, self._memory_info(video, frame_plan).group_plan(self.model.config)

    def encode(self, video: str | os.PathLike, *, progress: Callable[[StageEvent], None] | None = None) -> VideoMemory:
        """Decode, encode and prefill ``video`` group by group into a pruned, question-independent memory.

        ``progress`` is called with every stage event (from several threads) as the work proceeds.
        """
        if self.config.prune == PruneRule.QUESTION_ATTENTION:
            raise ConfigError(
                "prune='question_attention' scores tokens by the question, so its memory cannot serve other "
                "questions; use ask(video, question), or a question-independent rule to encode"
            )
        return self._encode(Path(video), Timeline(progress))

    def ask(
        self,
        video: str | os.PathLike | VideoMemory,
        question: str,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        progress: Callable[[StageEvent], None] | None = None,
    ) -> Answer:
        """Answer ``question`` about a video file, a :class:`VideoMemory`, or a saved memory's directory.

        Greedy unless ``do_sample`` (then ``temperature`` / ``top_k`` / ``top_p`` and ``seed`` apply). Generation
        stops at the model's stop tokens or after ``max_new_tokens``.
        """
        decode = answer_request(
            self.model, max_new_tokens, do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        )
        if not isinstance(question, str):
            raise InputError(f"question must be a string, got {type(question).__name__}")
        timeline = Timeline(progress)
        suffix = self.tokenizer.question_suffix(question)
        chunk_len = round_up(suffix.size, QUESTION_BUCKET)
        ride_along = suffix if self.config.prune == PruneRule.QUESTION_ATTENTION else None
        memory, owned = self._memory(video, timeline, ride_along, chunk_len + max_new_tokens)
        chunk = text_after_video(memory.plan, suffix, chunk_len)
        slots = int(memory.tokens_per_layer.max()) + chunk_len + max_new_tokens
        asked = _Question(chunk=chunk, length=suffix.size, slots=slots, consume=owned, decode=decode)
        with timeline.span("answer"):
            generate = self._answer_dense if self.model.sparsity is None else self._answer_sparse
            token_ids, kv_bytes = generate(memory, asked)
        return Answer(self.tokenizer.decode(token_ids), token_ids, timeline.timings(), kv_bytes)

    def ask_many(
        self,
        video: str | os.PathLike | VideoMemory,
        questions: Sequence[str],
        max_new_tokens: int = 128,
        do_sample: bool = False,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        progress: Callable[[StageEvent], None] | None = None,
    ) -> list[Answer]:
        """Answer every question about one video (a file, a :class:`VideoMemory` or a saved memory's directory),
        which is encoded or loaded once; answers in the order of ``questions``.

        All questions are prefilled in one packed pass behind the shared memory (each at the positions it would
        have alone, attending to the memory and to itself only) and answered as one decode batch
        (``qv_jax.pipeline.questions``); the memory is never copied. Every answer's ``kv_bytes`` is what the whole
        pass held: the memory once, plus every question and answer. With a sparsity config the questions are
        answered one after the other over the same memory (sparse decoding has no packed path yet). The other
        arguments are those of :meth:`ask`.
        """
        if isinstance(questions, str) or not len(questions):
            raise InputError("questions must be a non-empty list of strings")
        for i, question in enumerate(questions):
            if not isinstance(question, str):
                raise InputError(f"question {i} must be a string, got {type(question).__name__}")
        if self.config.prune == PruneRule.QUESTION_ATTENTION:
            raise ConfigError("prune='question_attention' makes a memory for one question; use ask per question")
        decode = answer_request(
            self.model, max_new_tokens, do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        )
        timeline = Timeline(progress)
        suffixes = [self.tokenizer.question_suffix(q) for q in questions]
        memory, _ = self._memory(video, timeline, None, 0)
        context = self.model.config.text.max_position_embeddings
        for i, suffix in enumerate(suffixes):
            if memory.plan.text_start + suffix.size + max_new_tokens > context:
                raise InputError(
                    f"question {i} with {max_new_tokens} new tokens passes the model's context of {context}"
                )
        if self.model.sparsity is not None:
            options = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed, "progress": progress}
            return [self.ask(memory, q, max_new_tokens, do_sample, **options) for q in questions]
        with timeline.span("answer"):
            tokens, kv_bytes = questions_answer(self.model, memory, suffixes, decode)
        timings = timeline.timings()
        return [Answer(self.tokenizer.decode(t), t, timings, kv_bytes) for t in tokens]

    def stream(self, carriers: int | None = 64, keep_visual: int | str = 0, fps: float = 1.0) -> VideoStream:
        """A live stream watched into a bounded memory of semantic carriers (VideoScan), asked at any time.

        ``carriers``: bank entries, one per temporal patch (``None``: keep every visual token, the memory grows);
        ``keep_visual``: visual tokens kept per patch beside its carrier (``k`` or ``"all"``); ``fps``: frames taken
        per second of stream time. See docs/streaming.md.
        """
        config = StreamConfig(carriers, keep_visual, fps)
        return VideoStream(self.model, config, system_prompt=self.config.system_prompt)

    # ---- stages -------------------------------------------------------------------------------------------------

    def _memory(
        self, video: str | os.PathLike | VideoMemory, timeline: Timeline, ride_along: np.ndarray | None, tail: int
    ) -> tuple[VideoMemory, bool]:
        """The memory of ``video`` (given, loaded, or encoded with room for ``tail`` tokens) and whether it was
        made here (its buffers may then be reused in place)."""
        if isinstance(video, VideoMemory):
            memory = video
        elif is_memory_dir(video):
            with timeline.span("load"):
                memory = VideoMemory.load(video)
        else:
            return self._encode(Path(video), timeline, question=ride_along, tail=tail), True
        memory.fingerprint.check(self.fingerprint, f"video memory of {memory.info.video}")
        return memory, False

    def _frame_plan(self, reader: VideoReader) -> FramePlan:
        c = self.config
        return reader.plan(
            fps=c.fps,
            max_frames=c.max_frames,
            min_pixels=VIDEO_MIN_PIXELS if c.min_pixels is None else c.min_pixels,
            max_pixels=c.max_pixels,
        )

    def _memory_info(self, video: str | os.PathLike, frame_plan: FramePlan) -> MemoryInfo:
        """What a memory of ``video`` made with these settings records; its group plan is the one to run."""
        c = self.config
        # the prompt prefix depends neither on the question nor on the grid size
        prefix = self.tokenizer.video_prompt("", (2, 2, 2), system=c.system_prompt).prefix
        return MemoryInfo(
            video=str(video),
            frame_indices=tuple(int(i) for i in frame_plan.indices),
            height=frame_plan.height,
            width=frame_plan.width,
            sample_fps=float(frame_plan.sample_fps),
            prefix_ids=tuple(int(i) for i in prefix),
            group_frames=c.group_frames,
            retention=c.retention,
            prune=str(c.prune),
            layer_decay=c.layer_decay,
            seed=c.seed,
        )

    def _encode(
        self, video: Path, timeline: Timeline, *, question: np.ndarray | None = None, tail: int = 0
    ) -> VideoMemory:
        """Run the video through the overlapped pipeline into a memory with room for ``tail`` more tokens.

        ``question`` (suffix ids) rides along behind every group for the ``question_attention`` rule.
        """
        m, c = self.model, self.config
        if not video.is_file():
            raise InputError(f"{video}: no such video file")
        with timeline.span("probe"):
            reader = VideoReader(video, workers=c.workers)
            frame_plan = self._frame_plan(reader)
            info = self._memory_info(video, frame_plan)
            plan = info.group_plan(m.config)
        ride_along = None
        if question is not None:
            ride_along = text_after_video(plan, question, round_up(question.size, QUESTION_BUCKET))
        riding = 0 if ride_along is None else ride_along.ids.size
        capacity = round_up(plan.capacity(ride_along=riding, answer=tail), CAPACITY_BUCKET)
        max_keep = tuple(int(k) for k in plan.keep.max(axis=0))
        base_key = jax.random.key(c.seed)

        def prefix() -> LayeredKV:
            """The memory of the prompt prefix (runs while the decoders start up)."""
            text = TextChunk(
                ids=plan.prefix_ids,
                positions=plan.prefix_positions,
                token_index=np.arange(plan.prefix_len, dtype=np.int32),
                valid=np.ones(plan.prefix_len, bool),
            )
            with timeline.span("prefill", -1):
                empty = m.make_cache(
                    LayeredKV.create,
                    num_layers=m.config.text.num_layers,
                    capacity=capacity,
                    num_kv_heads=m.config.text.num_kv_heads,
                    head_dim=m.config.text.head_dim,
                    dtype=m.dtype,
                )
                with m.mesh_context():
                    _, memory = prefill.prefill_text(m.graphdef, m.state, empty, text)
                return jax.block_until_ready(memory)

        def group_step(memory: LayeredKV, g: int, group: Frames) -> LayeredKV:
            """The memory after group ``g``: its frames encoded, prefilled behind the memory and pruned."""
            with timeline.span("vision", g):
                embeds = m.encode_video(group.frames)  # on a data-parallel mesh, frames split over "data"
                embeds.block_until_ready()
            with timeline.span("prefill", g), m.mesh_context():
                memory = prefill.prefill_group(
                    m.graphdef,
                    m.state,
                    memory,
                    embeds,
                    plan.group_positions[g],
                    plan.group_token_index(g),
                    plan.group_valid(g),
                    plan.keep[g],
                    jax.random.fold_in(base_key, g),
                    ride_along,
                    rule=c.prune,
                    max_keep=max_keep,
                )
                return jax.block_until_ready(memory)

        with reader:
            memory, _ = run_overlapped(
                reader.stream(frame_plan, group_size=c.group_frames),
                group_step,
                initial=prefix,
                group_frames=c.group_frames,
                timeline=timeline,
                device=None if m.plan is None else m.plan.sharding(),  # frames on every device
            )
        return VideoMemory(cache=memory, plan=plan, info=info, fingerprint=self.fingerprint, timings=timeline.timings())

    def _answer_dense(self, memory: VideoMemory, asked: _Question) -> tuple[np.ndarray, int]:
        """Question prefill and decoding over the pruned memory itself; ``(token ids, KV bytes held)``."""
        plan, cache = memory.plan, memory.cache
        if not asked.consume or cache.capacity < asked.slots:
            # a copy (a given memory is never used up), at least as large: encode leaves room for a whole group
            cache = cache.padded(max(cache.capacity, round_up(asked.slots, CAPACITY_BUCKET)))
        where = (plan.text_start + asked.length, plan.suffix_start + asked.length)
        return prefill.answer(self.model, cache, asked.chunk, where, asked.decode)

    def _answer_sparse(self, memory: VideoMemory, asked: _Question) -> tuple[np.ndarray, int]:
        """The memory as a sparse decode state, then sparse question prefill and decoding; ``(token ids, KV bytes
        held)``."""
        m, plan, sparsity = self.model, memory.plan, self.model.sparsity
        lengths = memory.tokens_per_layer
        if (lengths != lengths[0]).any():
            raise ConfigError(
                f"this memory's layers hold different token counts ({lengths.min()}-{lengths.max()}, made with "
                "layer_decay), which sparse decoding cannot take over; encode it without layer_decay"
            )
        layered = memory.cache
        # every layer holds its tokens in slots [0, length), in prompt order: one dense cache describes them all
        dense = KVCache(
            k=layered.k,
            v=layered.v,
            segment_ids=jnp.where(layered.token_index[0] >= 0, 0, -1).astype(jnp.int32),
            length=jnp.int32(lengths[0]),
        )
        capacity = max(asked.slots, layered.capacity)
        cache = m.place(SparseKVCache.from_dense(dense, sparsity, capacity=capacity, kv_repeat=m.kv_repeat))
        chunk = asked.chunk
        x = encode.embed(m.graphdef, m.state, jnp.asarray(chunk.ids[None]))
        segments = jnp.asarray(np.where(chunk.valid, 0, -1)[None].astype(np.int32))
        positions = jnp.asarray(chunk.positions[:, None])
        with m.mesh_context():  # Pallas kernels run per shard
            logits, cache = sparse.prefill(
                m.graphdef, m.state, cache, x, positions, segments, jnp.asarray([asked.length - 1])
            )
        loop = m.decode_loop(sparse, jnp.asarray([plan.text_start + asked.length], jnp.int32), asked.decode)
        tokens, _ = decode_answer(logits, cache, asked.decode, loop)
        token_ids = tokens[0]
        # tokens in the cache: the memory, the question and every generated token but the last
        held = int(lengths[0]) + asked.length + token_ids.size - 1
        window = sparsity.sink + sparsity.local
        text = m.config.text
        per_token = 2 * text.head_dim * jnp.dtype(m.dtype).itemsize
        heads = sparsity.retrieval_heads(text.num_layers, text.num_kv_heads)
        return token_ids, sum(r * held + (text.num_kv_heads - r) * min(held, window) for r in heads) * per_token
