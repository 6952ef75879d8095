"""A loaded model with numpy in / numpy out ``forward`` and ``generate``, and :func:`load_model`.

Argument meanings follow ``Qwen2_5_VLForConditionalGeneration`` in transformers: ``input_ids [B, T]`` with
``<|image_pad|>`` / ``<|video_pad|>`` runs, processor-style ``pixel_values`` / ``pixel_values_videos`` with their
``image_grid_thw`` / ``video_grid_thw``, ``second_per_grid_ts`` per video and an ``attention_mask`` (0 = padding).

Positions follow the ORIGINAL Qwen2.5-VL rule (``qv_jax.model.rope_index``), not transformers 5's: text after a
video continues at ``max(positions so far) + 1`` (see docs/positions.md).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qv_jax.attention.backends import AttentionConfig, Backend
from qv_jax.attention.heads import reorder_heads
from qv_jax.attention.sparsity import SparsityConfig
from qv_jax.cache.dense import KVCache
from qv_jax.cache.sparse import SparseKVCache, sparse_kv_bytes
from qv_jax.converters.hf_config import config_from_hf, generation_defaults
from qv_jax.converters.qwen2_5_vl import load_hf_state
from qv_jax.errors import CheckpointError, ConfigError, InputError
from qv_jax.model.checkpoint import MARKER, is_checkpoint, load_checkpoint, read_sparsity, save_checkpoint
from qv_jax.model.config import ModelConfig, token_ids
from qv_jax.model.qwen2_5_vl import QwenVL, random_state, with_attention
from qv_jax.model.rope_index import get_rope_index
from qv_jax.model.vision_layout import check_grid, grid_tokens
from qv_jax.numeric import round_up
from qv_jax.runtime import dense, encode, many, sparse
from qv_jax.runtime.generate import DecodeLoop, DecodeRequest, decode_answer
from qv_jax.runtime.sampling import SamplingParams
from qv_jax.runtime.steps import forward
from qv_jax.sharding.checkpoint import restore_checkpoint
from qv_jax.sharding.plan import ShardingPlan
from qv_jax.sharding.transfer import to_host

# Default prompt chunk of `generate`: prompts up to this many tokens prefill in one call.
DEFAULT_PREFILL_CHUNK = 2048


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """What ``generate(..., return_dict=True)`` returns: the token ids and the KV memory the run allocated."""

    sequences: np.ndarray  # prompt plus generated ids [B, T + n], as generate returns by default
    kv_bytes: int  # bytes of the KV cache buffers allocated for the run (dense or sparse)
    kv_capacity: int  # cache slots allocated


class VisionLanguageModel:
    """Qwen2.5-VL / Qwen2-VL ready to run: config, split NNX model (``graphdef``, ``state``), tokenizer.

    ``forward`` and ``generate`` take and return numpy arrays; the jitted pieces they are made of
    (``qv_jax.runtime.encode`` / ``dense`` / ``sparse``) take ``graphdef`` / ``state`` and can be driven directly by
    a pipeline.

    With a sharding ``plan`` (``load_model(..., mesh=)``, :meth:`shard`) the state lies on the plan's mesh, caches
    are created in their shards, batches go on the ``"data"`` axis, and ``config`` is the running config (KV heads
    replicated when the plan says so; :attr:`checkpoint_config` is the stored one).

    With ``sparsity`` (a :class:`~qv_jax.attention.SparsityConfig`) the attention weights are reordered once,
    retrieval heads first in every layer (the model computes the same function), and ``generate`` prefills and
    decodes with streaming heads and page selection (``qv_jax.runtime.sparse``); :attr:`sparsity` is the config in
    that head order. ``forward`` stays the dense model but for a LongGen hybrid's layer patterns.
    """

    def __init__(
        self,
        config: ModelConfig,
        graphdef: nnx.GraphDef,
        state: nnx.State,
        *,
        tokenizer=None,
        eos_token_ids: Sequence[int] | None = None,
        pad_token_id: int | None = None,
        source: str | None = None,
        plan: ShardingPlan | None = None,
        sparsity: SparsityConfig | None = None,
        attention: AttentionConfig | str = Backend.AUTO,
    ):
        self.config = config
        self.attention = attention if isinstance(attention, AttentionConfig) else AttentionConfig(attention)
        self.graphdef = with_attention(graphdef, state, self.attention)
        self.state = state
        self.plan = plan
        self.sparsity = None
        if sparsity is not None:
            t = config.text
            repeat = 1 if plan is None else plan.kv_repeat
            # the mask names the stored KV heads; a mesh's replicas of a head (qv_jax.sharding) share its role
            mask = np.repeat(sparsity.streaming_mask(t.num_layers, t.num_kv_heads // repeat), repeat, axis=1)
            self.state = reorder_heads(state, mask, num_heads=t.num_heads)
            if plan is not None:
                self.state = plan.reshard(self.state)
            if sparsity.streaming_heads is not None:
                sparsity = dataclasses.replace(sparsity, streaming_heads=mask)
            self.sparsity = sparsity.retrieval_first()
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        fallback = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.pad_token_id = pad_token_id if pad_token_id is not None else config.pad_token_id
        self.pad_token_id = fallback if self.pad_token_id is None else self.pad_token_id
        self.source = source

    @classmethod
    def random(
        cls,
        config: ModelConfig,
        *,
        dtype="float32",
        seed: int = 0,
        tokenizer=None,
        mesh: jax.sharding.Mesh | None = None,
        sparsity: SparsityConfig | None = None,
        attention: AttentionConfig | str = Backend.AUTO,
    ) -> VisionLanguageModel:
        """Random weights (transformers' init scheme) from a config alone; no torch, no checkpoint.

        With a ``mesh`` each tensor goes straight into its shards; the weights equal the unsharded ones of the
        same seed.
        """
        options = {"tokenizer": tokenizer, "sparsity": sparsity, "attention": attention}
        if mesh is None:
            graphdef, state = random_state(config, jnp.dtype(dtype), seed)
            return cls(config, graphdef, state, **options)
        plan = ShardingPlan.create(config, mesh)
        placed = {}
        random_state(config, jnp.dtype(dtype), seed, place=lambda path, v: placed.setdefault(path, plan.place(path, v)))
        return cls(plan.config, *plan.build(placed), plan=plan, **options)

    def shard(self, mesh: jax.sharding.Mesh) -> VisionLanguageModel:
        """The same model laid out on ``mesh`` (tensor by tensor; see ``qv_jax.sharding`` for the head rule)."""
        if self.sparsity is not None:
            raise ConfigError("shard() keeps no sparsity config; load with load_model(path, mesh=, sparsity=)")
        plan = ShardingPlan.create(self.checkpoint_config, mesh)
        state = self.state if self.plan is None else self.plan.checkpoint_state(self.state)
        return VisionLanguageModel(
            plan.config,
            *plan.place_state(state),
            tokenizer=self.tokenizer,
            eos_token_ids=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            source=self.source,
            plan=plan,
            attention=self.attention,
        )

    def with_attention(self, attention: AttentionConfig | str, kernel: str | None = None) -> VisionLanguageModel:
        """The same model (its arrays shared, not copied) running every attention as ``attention`` says."""
        config = attention if isinstance(attention, AttentionConfig) else AttentionConfig(attention, kernel)
        model = copy.copy(self)
        model.attention, model.graphdef = config, with_attention(self.graphdef, self.state, config)
        return model

    @property
    def mesh(self) -> jax.sharding.Mesh | None:
        """The mesh the model lies on, or ``None`` (one device)."""
        return None if self.plan is None else self.plan.mesh

    @property
    def checkpoint_config(self) -> ModelConfig:
        """The config as stored (differs from :attr:`config` only by KV heads replicated for a mesh)."""
        return self.config if self.plan is None else self.plan.checkpoint_config

    @property
    def model(self) -> QwenVL:
        """The NNX module (a fresh merge of ``graphdef`` and ``state``)."""
        return nnx.merge(self.graphdef, self.state)

    @property
    def dtype(self):
        return jax.tree.leaves(self.state)[0].dtype

    def save(
        self, out_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False
    ) -> Path:
        """Write a qv-jax checkpoint (orbax parameters, config json, tokenizer files from ``tokenizer_dir``); with
        :attr:`sparsity`, the weights as they run (retrieval heads first) and the config in that order."""
        if tokenizer_dir is None and self.source is not None:
            tokenizer_dir = self.source
        state = self.state if self.plan is None else self.plan.checkpoint_state(self.state)
        sparsity = None if self.sparsity is None else self.sparsity.fold_replicas(self.kv_repeat)
        options = {"tokenizer_dir": tokenizer_dir, "overwrite": overwrite, "sparsity": sparsity}
        return save_checkpoint(out_dir, self.checkpoint_config, state, **options)

    # ---- pieces -----------------------------------------------------------------------------------------------

    def position_ids(
        self,
        input_ids,
        *,
        image_grid_thw=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        attention_mask=None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(positions [3, B, T], rope_deltas [B, 1])`` by the original Qwen2.5-VL rule (Qwen2-VL's for Qwen2-VL)."""
        cfg = self.config
        if cfg.variant == "qwen2_vl":
            second_per_grid_ts = None  # Qwen2-VL has no time scale (transformers ignores it too)
        return get_rope_index(
            input_ids,
            image_grid_thw,
            video_grid_thw,
            second_per_grid_ts,
            attention_mask,
            spatial_merge_size=cfg.vision.spatial_merge_size,
            image_token_id=cfg.image_token_id,
            video_token_id=cfg.video_token_id,
            vision_start_token_id=cfg.vision_start_token_id,
            tokens_per_second=cfg.rope_tokens_per_second,
        )

    def encode_pixels(self, pixel_values, grid_thw) -> jax.Array:
        """Visual embeddings ``[tokens, D]`` of processor-style pixel values (all grids in one call)."""
        grid = check_grid(grid_thw, self.config.vision.spatial_merge_size)
        pixels = jnp.asarray(pixel_values)
        with self.mesh_context():
            if self.plan is not None and len(grid) == 1 and encode.splits_frames(self.plan.mesh, grid[0][0]):
                # one video on a data-parallel mesh: each data shard encodes its own frames
                return encode.encode_patches_by_frames(self.graphdef, self.state, pixels, grid, self.plan.mesh)
            return encode.encode_patches(self.graphdef, self.state, pixels, grid)

    def encode_video(self, frames) -> jax.Array:
        """Visual embeddings of one video given as uint8 frames ``[frames, height, width, 3]`` (height and width
        multiples of 28)."""
        frames = jnp.asarray(frames)
        pairs, rest = divmod(frames.shape[0], self.config.vision.temporal_patch_size)
        with self.mesh_context():
            if self.plan is not None and not rest and encode.splits_frames(self.plan.mesh, pairs):
                return encode.encode_frames_by_frames(self.graphdef, self.state, frames, self.plan.mesh)
            return encode.encode_frames(self.graphdef, self.state, frames)

    def encode_images(self, frames) -> jax.Array:
        """Visual embeddings of images of one size given as uint8 ``[images, height, width, 3]``, concatenated."""
        with self.mesh_context():
            return encode.encode_frames(self.graphdef, self.state, jnp.asarray(frames), as_images=True)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty dense KV cache for ``batch`` rows of ``capacity`` slots in the model's dtype.

        On a mesh it is created in its shards: KV heads on ``"model"``, rows on ``"data"`` when it divides them.
        """
        return self.make_cache(KVCache.create, batch=batch, capacity=capacity, **self._kv_shape)

    def new_sparse_cache(self, batch: int, capacity: int) -> SparseKVCache:
        """An empty sparse KV cache (needs ``sparsity``) for ``capacity`` slots, rounded up to whole pages."""
        if self.sparsity is None:
            raise ConfigError("this model has no sparsity config (load_model(..., sparsity=SparsityConfig(...)))")
        shape = {"batch": batch, "capacity": capacity, "kv_repeat": self.kv_repeat, **self._kv_shape}
        return self.make_cache(SparseKVCache.create, sparsity=self.sparsity, **shape)

    @property
    def _kv_shape(self) -> dict:
        t = self.config.text
        return {"num_layers": t.num_layers, "num_kv_heads": t.num_kv_heads, "head_dim": t.head_dim, "dtype": self.dtype}

    @property
    def kv_repeat(self) -> int:
        """Consecutive KV heads that are replicas of one stored head (1 but on a mesh that replicates them)."""
        return 1 if self.plan is None else self.plan.kv_repeat

    def make_cache(self, create, **shape):
        """``create(**shape)`` (a cache constructor, e.g. ``LayeredKV.create``), made directly in its shards when
        the model lies on a mesh."""
        return create(**shape) if self.plan is None else self.plan.create_in_shards(create, **shape)

    def place(self, cache):
        """A cache made elsewhere (e.g. a memory loaded on one device) in the model's layout: its shards on a mesh."""
        return cache if self.plan is None else self.plan.shard(cache)

    def kv_cache_bytes(self, context_len: int, batch: int = 1) -> int:
        """Bytes of the KV cache for ``context_len`` slots: dense, or sparse with the model's ``sparsity``.

        Counts every buffer the cache holds (keys, values, the sparse cache's key min / max and bookkeeping); the
        sparse capacity is rounded up like :meth:`new_sparse_cache` does.
        """
        t = self.config.text
        if self.sparsity is not None:
            return sparse_kv_bytes(self.sparsity, batch=batch, capacity=context_len, **self._kv_shape)
        item = jnp.dtype(self.dtype).itemsize
        return 2 * t.num_layers * batch * t.num_kv_heads * context_len * t.head_dim * item + 4 * batch * context_len + 4

    def decode_loop(self, steps, positions_B: jax.Array, request: DecodeRequest) -> DecodeLoop:
        """The decode loop of ``steps`` (``qv_jax.runtime.dense`` or ``sparse``) for :func:`decode_answer`, from
        rotary positions ``positions_B``, run in the model's mesh context."""

        def loop(cache, first_B, done_B, rng, stop_ids, num_steps):
            pad = jnp.int32(request.pad_id)
            with self.mesh_context():
                rest, _, cache = steps.decode_loop(
                    self.graphdef,
                    self.state,
                    cache,
                    first_B,
                    positions_B,
                    done_B,
                    rng,
                    stop_ids,
                    pad,
                    request.sampling,
                    num_steps=num_steps,
                )
            return rest, cache

        return loop

    def mesh_context(self):
        """The model's mesh as the context mesh, or no context: run every step inside it, so that Pallas kernels
        run per shard."""
        return contextlib.nullcontext() if self.plan is None else jax.set_mesh(self.plan.mesh)

    def _batch(self, value, batch_dim: int = 0) -> jax.Array:
        """A host batch (rows on ``batch_dim``) on device; on a mesh, rows on the ``"data"`` axis."""
        return jnp.asarray(value) if self.plan is None else self.plan.put_batch(value, batch_dim)

    def _prepare(
        self,
        input_ids,
        attention_mask,
        pixel_values,
        image_grid_thw,
        pixel_values_videos,
        video_grid_thw,
        second_per_grid_ts,
        position_ids,
    ) -> tuple[jax.Array, np.ndarray, np.ndarray]:
        """Embeddings ``[B, T, D]``, positions ``[3, B, T]`` and segment ids ``[B, T]`` of a prompt batch."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids must be an integer array [B, T], got {ids.dtype} {ids.shape}")
        if ids.size == 0:
            raise InputError("input_ids is empty")
        vocab = self.config.text.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise InputError(f"input_ids hold ids outside the vocabulary [0, {vocab})")
        mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask {mask.shape} does not match input_ids {ids.shape}")
        cfg = self.config
        embeds = {}
        for kind, pixels, grid_thw, token in (
            ("image", pixel_values, image_grid_thw, cfg.image_token_id),
            ("video", pixel_values_videos, video_grid_thw, cfg.video_token_id),
        ):
            slots = int(np.sum(ids == token))
            if pixels is None:
                if slots:
                    raise InputError(f"input_ids hold {slots} {kind} pad tokens but no {kind} pixels were given")
                continue
            if grid_thw is None:
                raise InputError(f"{kind} pixels given without {kind}_grid_thw")
            grid = check_grid(grid_thw, cfg.vision.spatial_merge_size)
            tokens = grid_tokens(grid, cfg.vision.spatial_merge_size)
            if tokens != slots:
                raise InputError(
                    f"{kind} grids {grid} make {tokens} tokens but input_ids hold {slots} {kind} pad tokens"
                )
            embeds[kind] = self.encode_pixels(pixels, grid)
        if position_ids is None:
            positions, _ = self.position_ids(
                ids,
                image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw,
                second_per_grid_ts=second_per_grid_ts,
                attention_mask=attention_mask,
            )
        else:
            positions = np.asarray(position_ids)
            if positions.shape != (3, *ids.shape):
                raise InputError(f"position_ids must be [3, B, T] = {(3, *ids.shape)}, got {positions.shape}")
        x = encode.embed(
            self.graphdef, self.state, self._batch(ids.astype(np.int32)), embeds.get("image"), embeds.get("video")
        )
        segment_ids = np.where(mask != 0, 0, -1).astype(np.int32)
        return x, positions.astype(np.int32), segment_ids

    # ---- the HF-style contract --------------------------------------------------------------------------------

    def forward(
        self,
        input_ids,
        *,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        position_ids=None,
    ) -> np.ndarray:
        """Float32 logits ``[B, T, V]`` of a prompt batch (one jitted forward, no cache); a LongGen hybrid attends
        with its layer patterns (as its prefill does on rows without padding), any other model densely.

        ``position_ids [3, B, T]`` overrides the computed positions. Logits at padded positions are meaningless.
        """
        x, positions, segment_ids = self._prepare(
            input_ids,
            attention_mask,
            pixel_values,
            image_grid_thw,
            pixel_values_videos,
            video_grid_thw,
            second_per_grid_ts,
            position_ids,
        )
        t, sparsity = self.config.text, self.sparsity
        hybrid = sparsity is not None and sparsity.is_hybrid
        patterns = sparsity.layer_patterns(t.num_layers, t.num_kv_heads, self.kv_repeat) if hybrid else None
        with self.mesh_context():
            logits = forward(
                self.graphdef, self.state, x, self._batch(positions, 1), self._batch(segment_ids), patterns
            )
        return to_host(logits)

    def generate(
        self,
        input_ids,
        *,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        max_new_tokens: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        seed: int = 0,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        return_dict: bool = False,
    ) -> np.ndarray | GenerationOutput:
        """Prompt plus generated tokens ``[B, T + n]`` (``n <= max_new_tokens``), like transformers' ``generate``.

        Greedy unless ``do_sample``. A row ends at its first stop token (``eos_token_id``, default the model's; an
        empty list disables stopping) and is filled with ``pad_token_id`` after it; generation ends when every row
        has ended. Rows may be padded on either side: they are left-aligned internally. The prompt is prefilled in
        chunks of at most ``prefill_chunk`` tokens, then decoding runs on device in one ``while_loop``. With the
        model's ``sparsity`` both run over a sparse cache. ``return_dict=True`` returns a :class:`GenerationOutput`
        (the ids as ``sequences``, plus the KV bytes allocated).
        """
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if prefill_chunk < 1:
            raise InputError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        params = SamplingParams(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise InputError(f"input_ids must be [B, T], got shape {ids.shape}")
        mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask {mask.shape} does not match input_ids {ids.shape}")
        if np.any((mask != 0).sum(axis=-1) == 0):
            raise InputError("a row of attention_mask masks every token")
        # left-align every row: padding first, so the last prompt tokens share one slot and decoding appends
        order = np.argsort(mask != 0, axis=-1, kind="stable")
        aligned_ids = np.take_along_axis(ids, order, axis=-1)
        aligned_mask = np.take_along_axis(mask, order, axis=-1)
        x, positions, segment_ids = self._prepare(
            aligned_ids,
            aligned_mask,
            pixel_values,
            image_grid_thw,
            pixel_values_videos,
            video_grid_thw,
            second_per_grid_ts,
            None,
        )
        batch, length = aligned_ids.shape
        next_position = np.where(aligned_mask != 0, positions.max(axis=0), -1).max(axis=-1) + 1

        chunk = min(prefill_chunk, round_up(length, 64))
        padded = round_up(length, chunk)
        pad = padded - length
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        positions = np.pad(positions, ((0, 0), (0, 0), (0, pad)))
        segment_ids = np.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
        capacity = round_up(padded + max_new_tokens - 1, 128)
        run = dense if self.sparsity is None else sparse
        cache = self.new_cache(batch, capacity) if self.sparsity is None else self.new_sparse_cache(batch, capacity)
        kv_bytes, kv_capacity = cache.nbytes, cache.capacity
        last_index = np.full((batch,), (length - 1) % chunk, np.int32)
        with self.mesh_context():
            for start in range(0, padded, chunk):
                logits, cache = run.prefill(
                    self.graphdef,
                    self.state,
                    cache,
                    x[:, start : start + chunk],
                    self._batch(positions[:, :, start : start + chunk], 1),
                    self._batch(segment_ids[:, start : start + chunk]),
                    self._batch(last_index),
                )
        stop_ids = token_ids(self.eos_token_ids if eos_token_id is None else eos_token_id)
        pad = self.pad_token_id if pad_token_id is None else int(pad_token_id)
        request = DecodeRequest(max_new_tokens, params, stop_ids=stop_ids, pad_id=pad, seed=seed)
        loop = self.decode_loop(run, self._batch(next_position.astype(np.int32)), request)
        new_tokens, _ = decode_answer(logits, cache, request, loop)
        sequences = np.concatenate([ids, new_tokens], axis=1)
        if return_dict:
            return GenerationOutput(sequences=sequences, kv_bytes=kv_bytes, kv_capacity=kv_capacity)
        return sequences

    def generate_many(
        self, prompts, *, max_new_tokens: int = 16, packing: bool = True, bin_tokens: int | None = None, **options
    ) -> list[np.ndarray]:
        """New tokens of every prompt (token ids ``[n]``, or a mapping of ``input_ids`` and that prompt's vision
        keywords of :meth:`generate`), in input order, each up to its first stop token (included).

        ``packing=True`` prefills the prompts packed into bins of ``bin_tokens`` (default: the longest prompt) by
        best-fit decreasing (``qv_jax.runtime.packing``); ``packing=False`` as one padded batch. ``options``: the
        sampling keywords of :meth:`generate` and ``eos_token_id`` / ``pad_token_id`` / ``seed``.
        """
        stops = {k: options.pop(k) for k in ("eos_token_id", "pad_token_id", "seed") if k in options}
        run = {"max_new_tokens": max_new_tokens, "packing": packing, "bin_tokens": bin_tokens}
        return many.generate_many(self, prompts, **run, sampling=SamplingParams(**options), **stops)


def load_model(
    path: str | os.PathLike,
    dtype="float32",
    *,
    tokenizer: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    sparsity: SparsityConfig | None = None,
    attention: AttentionConfig | str = Backend.AUTO,
    attention_kernel: str | None = None,
) -> VisionLanguageModel:
    """Load a Hugging Face model directory (converted on the fly) or a qv-jax checkpoint.

    ``dtype`` is the parameter and activation dtype (``"float32"``, ``"bfloat16"``, ...). The tokenizer is read
    from ``tokenizer.json`` in the same directory when present (``tokenizer=False`` skips it). With a ``mesh``
    (``qv_jax.make_mesh``) every device reads only its slice of each tensor into its shard (see
    ``qv_jax.sharding``); :class:`~qv_jax.errors.ShardingError` if the model cannot be laid out on it. With
    ``sparsity`` (:class:`~qv_jax.attention.SparsityConfig`; default: the one saved in ``config.json``, e.g. a
    LongGen hybrid's) ``generate`` decodes sparsely (see :class:`VisionLanguageModel`). ``attention`` /
    ``attention_kernel``: what runs every attention of the model (:class:`~qv_jax.attention.backends.AttentionConfig`;
    docs/attention.md, "Backends").
    """
    if not isinstance(attention, AttentionConfig):
        attention = AttentionConfig(attention, attention_kernel)
    model_dir = Path(path)
    if not model_dir.is_dir():
        kind = "a file, not a model directory" if model_dir.exists() else "no such model directory"
        raise CheckpointError(f"{model_dir}: {kind}")
    try:
        floating = dtype is None or jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise ConfigError(f"dtype must be a floating type (float32, bfloat16, float16), got {dtype!r}")
    plan, sparsity = None, read_sparsity(model_dir) if sparsity is None else sparsity
    if is_checkpoint(model_dir):
        if mesh is None:
            config, graphdef, state = load_checkpoint(model_dir, dtype)
        else:
            plan, graphdef, state = restore_checkpoint(model_dir, mesh, dtype)
            config = plan.config
    elif (model_dir / "config.json").is_file():
        if mesh is not None:
            plan = ShardingPlan.create(config_from_hf(model_dir), mesh)
        config, graphdef, state = load_hf_state(model_dir, dtype=dtype, plan=plan)
    else:
        raise CheckpointError(f"{model_dir}: neither a qv-jax checkpoint ({MARKER}) nor an HF model (config.json)")
    tok = None
    if tokenizer and (model_dir / "tokenizer.json").is_file():
        from qv_jax.model.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(model_dir)
    eos, pad = generation_defaults(model_dir)
    if eos is not None:
        eos = tuple(dict.fromkeys((*config.eos_token_ids, *eos)))
    return VisionLanguageModel(
        config,
        graphdef,
        state,
        tokenizer=tok,
        eos_token_ids=eos,
        pad_token_id=pad,
        source=str(model_dir),
        plan=plan,
        sparsity=sparsity,
        attention=attention,
    )
