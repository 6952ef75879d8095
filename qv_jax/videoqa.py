"""VideoQA: answer a question about a long video — parallel decoding, group-wise pruned prefill, overlap.

``ask(video, question)`` runs, for one video:

1. **plan** — probe the file and pick frames and size by Qwen2.5-VL's rules (``fps``, ``max_frames``, the pixel
   budget); the token layout, positions and cache size follow before any pixel is decoded;
2. **decode** — the QuickDecoder pool decodes keyframe intervals in parallel, drained ahead of the device;
3. **vision + prefill** — group by group: the ViT encodes ``group_frames`` frames, the LLM prefills them over the
   pruned memory of earlier groups, and every layer keeps ``⌈retention · n⌉`` of the group's ``n`` tokens;
4. **answer** — the question is appended behind the memory at its original positions, then tokens are generated.

Stages 2 and 3 overlap (see ``qv_jax.pipeline.executor``); :class:`Answer` reports each stage's busy time and the
wall time. ``encode(video)`` stops after stage 3 and returns a :class:`~qv_jax.memory.VideoMemory`, which ``ask``
accepts in place of a video (or a saved memory's directory), so one encode serves many questions.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qv_jax.cache.dense import KVCache
from qv_jax.cache.sparse import SparseKVCache
from qv_jax.errors import ConfigError, InputError
from qv_jax.memory import MemoryInfo, ModelFingerprint, VideoMemory, is_memory_dir
from qv_jax.model.tokenizer import DEFAULT_SYSTEM_PROMPT
from qv_jax.pipeline import steps as pipeline_steps
from qv_jax.pipeline.cache import LayeredKV
from qv_jax.pipeline.executor import StageEvent, Timeline, Timings, run_overlapped
from qv_jax.pipeline.plan import GroupPlan, check_settings
from qv_jax.pipeline.steps import TextChunk, text_after_video
from qv_jax.runtime import sparse as sparse_steps
from qv_jax.runtime import steps as model_steps
from qv_jax.runtime.sampling import SamplingParams, jit_sample
from qv_jax.runtime.vlm import VisionLanguageModel, load_model
from qv_jax.sharding import MEMORY_LAYOUTS
from qv_jax.video import FramePlan, VideoReader
from qv_jax.video.sampling import VIDEO_MIN_PIXELS

__all__ = ["Answer", "VideoQA"]

# Question chunks are padded to a multiple of this many tokens, cache capacities to a multiple of CAPACITY_BUCKET,
# so questions of similar length reuse compiled steps.
QUESTION_BUCKET = 32
CAPACITY_BUCKET = 128


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Answer:
    """An answer: its ``text`` (special tokens left out), the generated ``token_ids`` (a final stop token
    included), ``timings`` of every stage, and ``kv_bytes``, the keys and values the cache held at the end
    (pruned video memory + question + answer, all layers)."""

    text: str
    token_ids: np.ndarray
    timings: Timings
    kv_bytes: int


class VideoQA:
    """Questions about videos with a Qwen2.5-VL / Qwen2-VL model, QuickVideo-style.

    A model loaded with a sparsity config (``load_model(..., sparsity=)``, or ``from_pretrained(sparsity=)``)
    answers with sparse decoding: the pruned memory becomes its sparse decode state (``SparseKVCache.from_dense``:
    retrieval heads keep every memory token, streaming heads their sink and most recent tokens), then the question
    and the answer run through ``qv_jax.runtime.sparse``.

    Args:
      model: a loaded model with a tokenizer (``qv_jax.load_model`` or ``VisionLanguageModel``).
      group_frames: frames per prefill group (a multiple of the temporal patch size, 2).
      retention: fraction ``ρ`` of each group's tokens every layer keeps, in (0, 1].
      prune: score rule: ``key_norms_small`` (default), ``key_norms``, ``value_norms``, ``random``,
        ``question_attention`` (needs the question up front, so no reusable memory) or ``none``.
      fps / max_frames: Qwen's frame sampling (``max_frames`` caps the count).
      max_pixels / min_pixels: per-frame pixel bounds of Qwen's ``smart_resize``; ``None`` uses Qwen's video
        budget (``min 128·28²``, ``max`` from the 128K-token total budget).
      layer_decay: optional per-layer decay of the retention, ``ρ_l = ρ · decay^l``.
      workers: decoder processes (default: CPU count).
      seed: seed of the ``random`` rule.
      system_prompt: the system turn of the chat prompt.
    """

    def __init__(
        self,
        model: VisionLanguageModel,
        *,
        group_frames: int = 16,
        retention: float = 0.5,
        prune: str = "key_norms_small",
        fps: float = 2.0,
        max_frames: int = 768,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        layer_decay: float | None = None,
        workers: int | None = None,
        seed: int = 0,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    ):
        if model.tokenizer is None:
            raise ConfigError(
                f"model {model.source or ''} has no tokenizer; VideoQA needs tokenizer.json in the model directory"
            )
        check_settings(
            model.config, group_frames=group_frames, retention=retention, prune=prune, layer_decay=layer_decay
        )
        if model.sparsity is not None and layer_decay is not None:
            raise ConfigError(
                "layer_decay leaves layers with different token counts, which sparse decoding cannot take over; "
                "use layer_decay=None or a model without sparsity"
            )
        if not fps > 0:
            raise ConfigError(f"fps must be positive, got {fps!r}")
        if not isinstance(max_frames, int) or max_frames < 2:
            raise ConfigError(f"max_frames must be an integer >= 2, got {max_frames!r}")
        for name, value in (("max_pixels", max_pixels), ("min_pixels", min_pixels)):
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value!r}")
        self.model = model
        self.tokenizer = model.tokenizer
        self.group_frames = group_frames
        self.retention = float(retention)
        self.prune = prune
        self.fps = float(fps)
        self.max_frames = max_frames
        self.max_pixels = max_pixels
        self.min_pixels = min_pixels
        self.layer_decay = layer_decay
        self.workers = workers
        self.seed = seed
        self.system_prompt = system_prompt
        # what memories made here carry and memories used here must match
        self.fingerprint = ModelFingerprint.of(model.config, model.state)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        group_frames: int = 16,
        retention: float = 0.5,
        prune: str = "key_norms_small",
        fps: float = 2.0,
        max_frames: int = 768,
        max_pixels: int | None = None,
        sparsity=None,
        *,
        dtype: str | None = None,
        mesh=None,
        **options,
    ) -> VideoQA:
        """Load a model directory (HF or qv-jax checkpoint, with its tokenizer) and wrap it.

        ``dtype`` defaults to bfloat16 on GPU / TPU and float32 on CPU. ``options`` are the other keywords of
        :class:`VideoQA` (``min_pixels``, ``layer_decay``, ``workers``, ``seed``, ``system_prompt``). With a
        ``mesh`` (``qv_jax.make_mesh``, one process) the model is loaded into its shards and the memory is split by
        KV head like the model's caches (see ``qv_jax.sharding``). With ``sparsity`` (a
        :class:`~qv_jax.attention.SparsityConfig`) answers are decoded sparsely (see the class docstring).
        """
        if dtype is None:
            dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        model = load_model(path, dtype, mesh=mesh, sparsity=sparsity)
        return cls(
            model,
            group_frames=group_frames,
            retention=retention,
            prune=prune,
            fps=fps,
            max_frames=max_frames,
            max_pixels=max_pixels,
            **options,
        )

    # ---- public API ---------------------------------------------------------------------------------------------

    def plan(self, video: str | os.PathLike) -> tuple[FramePlan, GroupPlan]:
        """The frame plan and the group plan of ``video``, from a probe alone (nothing is decoded)."""
        with VideoReader(video, workers=self.workers) as reader:
            frame_plan = self._frame_plan(reader)
        return frame_plan, self._memory_info(video, frame_plan).group_plan(self.model.config)

    def encode(self, video: str | os.PathLike, *, progress: Callable[[StageEvent], None] | None = None) -> VideoMemory:
        """Decode, encode and prefill ``video`` group by group into a pruned, question-independent memory.

        ``progress`` is called with every stage event (from several threads) as the work proceeds.
        """
        if self.prune == "question_attention":
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
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not isinstance(question, str):
            raise InputError(f"question must be a string, got {type(question).__name__}")
        params = SamplingParams(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        timeline = Timeline(progress)
        suffix = self.tokenizer.question_suffix(question)
        bucket = _round_up(suffix.size, QUESTION_BUCKET)
        owned = not isinstance(video, VideoMemory) and not is_memory_dir(video)
        if isinstance(video, VideoMemory):
            memory = video
        elif not owned:
            with timeline.span("load"):
                memory = VideoMemory.load(video)
        else:
            ride_along = suffix if self.prune == "question_attention" else None
            memory = self._encode(Path(video), timeline, question=ride_along, tail=bucket + max_new_tokens)
        if not owned:
            memory.fingerprint.check(self.fingerprint, f"video memory of {memory.info.video}")
        return self._answer(memory, suffix, max_new_tokens, params, seed, timeline, consume=owned)

    # ---- stages -------------------------------------------------------------------------------------------------

    def _frame_plan(self, reader: VideoReader) -> FramePlan:
        return reader.plan(
            fps=self.fps,
            max_frames=self.max_frames,
            min_pixels=VIDEO_MIN_PIXELS if self.min_pixels is None else self.min_pixels,
            max_pixels=self.max_pixels,
        )

    def _new_memory(self, capacity: int) -> LayeredKV:
        """An empty memory, created in its shards when the model lies on a mesh."""
        text = self.model.config.text
        shape = {
            "num_layers": text.num_layers,
            "capacity": capacity,
            "num_kv_heads": text.num_kv_heads,
            "head_dim": text.head_dim,
            "dtype": self.model.dtype,
        }
        if self.model.plan is None:
            return LayeredKV.create(**shape)
        return self.model.plan.create_in_shards(LayeredKV.create, MEMORY_LAYOUTS, **shape)

    def _memory_info(self, video: str | os.PathLike, frame_plan: FramePlan) -> MemoryInfo:
        """What a memory of ``video`` made with these settings records; its group plan is the one to run."""
        # the prompt prefix depends neither on the question nor on the grid size
        prefix = self.tokenizer.video_prompt("", (2, 2, 2), system=self.system_prompt).prefix
        return MemoryInfo(
            video=str(video),
            frame_indices=tuple(int(i) for i in frame_plan.indices),
            height=frame_plan.height,
            width=frame_plan.width,
            sample_fps=float(frame_plan.sample_fps),
            prefix_ids=tuple(int(i) for i in prefix),
            group_frames=self.group_frames,
            retention=self.retention,
            prune=self.prune,
            layer_decay=self.layer_decay,
            seed=self.seed,
        )

    def _encode(
        self, video: Path, timeline: Timeline, *, question: np.ndarray | None = None, tail: int = 0
    ) -> VideoMemory:
        """Run the video through the overlapped pipeline into a memory with room for ``tail`` more tokens.

        ``question`` (suffix ids) rides along behind every group for the ``question_attention`` rule.
        """
        m = self.model
        if not video.is_file():
            raise InputError(f"{video}: no such video file")
        with timeline.span("probe"):
            reader = VideoReader(video, workers=self.workers)
            frame_plan = self._frame_plan(reader)
            info = self._memory_info(video, frame_plan)
            plan = info.group_plan(m.config)
        with reader:
            ride_along = None
            if question is not None:
                ride_along = text_after_video(plan, question, _round_up(question.size, QUESTION_BUCKET))
            riding = 0 if ride_along is None else ride_along.ids.size
            capacity = _round_up(plan.capacity(ride_along=riding, answer=tail), CAPACITY_BUCKET)
            max_keep = tuple(int(k) for k in plan.keep.max(axis=0))
            base_key = jax.random.key(self.seed)
            cache: LayeredKV | None = None

            def prefill_prefix() -> None:
                nonlocal cache
                prefix = TextChunk(
                    ids=plan.prefix_ids,
                    positions=plan.prefix_positions,
                    token_index=np.arange(plan.prefix_len, dtype=np.int32),
                    valid=np.ones(plan.prefix_len, bool),
                )
                with timeline.span("prefill", -1):
                    empty = self._new_memory(capacity)
                    _, cache = pipeline_steps.prefill_text(m.graphdef, m.state, empty, prefix)
                    jax.block_until_ready(cache)

            def step(g: int, group) -> None:
                nonlocal cache
                with timeline.span("vision", g):
                    embeds = m.encode_video(group.frames)  # on a data-parallel mesh, frames split over "data"
                    embeds.block_until_ready()
                with timeline.span("prefill", g):
                    cache = pipeline_steps.prefill_group(
                        m.graphdef,
                        m.state,
                        cache,
                        embeds,
                        plan.group_positions[g],
                        plan.group_token_index(g),
                        plan.group_valid(g),
                        plan.keep[g],
                        jax.random.fold_in(base_key, g),
                        ride_along,
                        rule=self.prune,
                        max_keep=max_keep,
                    )
                    jax.block_until_ready(cache)

            run_overlapped(
                reader.stream(frame_plan, group_size=self.group_frames),
                step,
                group_frames=self.group_frames,
                timeline=timeline,
                before_first=prefill_prefix,
                device=None if self.model.plan is None else self.model.plan.sharding(),  # frames on every device
            )
        return VideoMemory(cache=cache, plan=plan, info=info, fingerprint=self.fingerprint, timings=timeline.timings())

    def _answer(
        self,
        memory: VideoMemory,
        suffix: np.ndarray,
        max_new_tokens: int,
        params: SamplingParams,
        seed: int,
        timeline: Timeline,
        *,
        consume: bool,
    ) -> Answer:
        """Append the question behind ``memory`` at its original positions and generate. ``consume`` lets the
        memory's buffers be reused in place (a memory made for this one question); otherwise the memory stays
        usable."""
        chunk = text_after_video(memory.plan, suffix, _round_up(suffix.size, QUESTION_BUCKET))
        need = int(memory.tokens_per_layer.max()) + chunk.ids.size + max_new_tokens
        knobs = params.knobs()
        rng, key = jax.random.split(jax.random.key(seed))
        generate = self._generate_dense if self.model.sparsity is None else self._generate_sparse
        with timeline.span("answer"):
            token_ids, kv_bytes = generate(
                memory, chunk, suffix.size, need, max_new_tokens, params, knobs, rng, key, consume=consume
            )
        return Answer(
            text=self.tokenizer.decode(token_ids),
            token_ids=token_ids,
            timings=timeline.timings(),
            kv_bytes=kv_bytes,
        )

    def _generate_dense(self, memory, chunk, count, need, max_new_tokens, params, knobs, rng, key, *, consume):
        """Question prefill and decoding over the pruned memory itself; ``(token ids, KV bytes held)``."""
        m, plan = self.model, memory.plan
        cache = memory.cache
        if not consume or cache.capacity < need:
            cache = cache.padded(_round_up(need, CAPACITY_BUCKET))
        if self.model.plan is not None:
            cache = self.model.plan.shard_memory(cache)  # a loaded memory arrives on one device
        logits, cache = pipeline_steps.prefill_text(m.graphdef, m.state, cache, chunk)
        first_B = jit_sample(logits[None], key, do_sample=params.do_sample, **knobs)
        tokens = [first_B]  # fetched once the decode loop is queued, not before
        if max_new_tokens > 1:
            rest, generated, cache = pipeline_steps.decode_loop(
                m.graphdef,
                m.state,
                cache,
                first_B[0],
                jnp.int32(plan.text_start + count),
                jnp.int32(plan.suffix_start + count),
                rng,
                jnp.asarray(m.eos_token_ids, jnp.int32),
                num_steps=max_new_tokens - 1,
                do_sample=params.do_sample,
                **knobs,
            )
            tokens.append(np.asarray(rest)[: int(generated)])
        return np.concatenate(tokens).astype(np.int32), cache.kv_bytes

    def _generate_sparse(self, memory, chunk, count, need, max_new_tokens, params, knobs, rng, key, *, consume):
        """The memory as a sparse decode state, then sparse question prefill and decoding (``qv_jax.runtime.sparse``);
        ``(token ids, KV bytes held)``."""
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
        cache = SparseKVCache.from_dense(dense, sparsity, capacity=max(need, layered.capacity))
        if self.model.plan is not None:  # split by KV head; replicated heads select the pages their head would
            cache = self.model.plan.shard_sparse_cache(cache)
        x = model_steps.embed(m.graphdef, m.state, jnp.asarray(chunk.ids[None]))
        segments = jnp.asarray(np.where(chunk.valid, 0, -1)[None].astype(np.int32))
        with m.mesh_context():  # Pallas kernels run per shard
            logits, cache = sparse_steps.prefill(
                m.graphdef, m.state, cache, x, jnp.asarray(chunk.positions[:, None]), segments, jnp.asarray([count - 1])
            )
        first = jit_sample(logits, key, do_sample=params.do_sample, **knobs)
        stop = jnp.asarray(m.eos_token_ids, jnp.int32)
        tokens = [first]  # fetched once the decode loop is queued, not before
        if max_new_tokens > 1:
            with m.mesh_context():
                rest, _, cache = sparse_steps.decode_loop(
                    m.graphdef,
                    m.state,
                    cache,
                    first,
                    jnp.asarray([plan.text_start + count], jnp.int32),
                    jnp.isin(first, stop),
                    rng,
                    stop,
                    jnp.int32(m.pad_token_id),
                    num_steps=max_new_tokens - 1,
                    do_sample=params.do_sample,
                    **knobs,
                )
            tokens.append(np.asarray(rest)[0])
        tokens = np.concatenate(tokens)
        ended = np.flatnonzero(np.isin(tokens, np.asarray(m.eos_token_ids)))
        token_ids = (tokens if ended.size == 0 else tokens[: ended[0] + 1]).astype(np.int32)
        # tokens in the cache: the memory, the question and every generated token but the last
        held = int(lengths[0]) + count + token_ids.size - 1
        window = sparsity.sink + sparsity.local
        text = m.config.text
        per_token = 2 * text.head_dim * jnp.dtype(m.dtype).itemsize
        heads = sparsity.retrieval_heads(text.num_layers, text.num_kv_heads)
        return token_ids, sum(r * held + (text.num_kv_heads - r) * min(held, window) for r in heads) * per_token
