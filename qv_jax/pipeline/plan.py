"""The token layout of a question about a video, fixed by the frame plan before any pixel is decoded (no JAX).

A prompt is ``prefix | video | suffix`` (``qv_jax.model.tokenizer.VideoPrompt``); QuickPrefill runs the prefix,
then the video in groups of equal token count (the last padded and masked, so one compiled step serves all), then
the suffix. :class:`GroupPlan` holds the groups' tokens, the M-RoPE positions of the whole unpruned prompt and how
many tokens of each group every layer keeps (docs/videoqa.md).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from qv_jax.errors import ConfigError, InputError
from qv_jax.model.config import ModelConfig
from qv_jax.model.rope_index import text_position_block, vision_position_block

__all__ = ["PRUNE_RULES", "GroupPlan", "PruneRule", "check_settings", "keep_counts", "make_group_plan"]


class PruneRule(enum.StrEnum):
    """Which of a group's new tokens each layer keeps (the scores of ``qv_jax.pipeline.scores``)."""

    KEY_NORMS_SMALL = "key_norms_small"
    KEY_NORMS = "key_norms"
    VALUE_NORMS = "value_norms"
    RANDOM = "random"
    QUESTION_ATTENTION = "question_attention"
    NONE = "none"


PRUNE_RULES = tuple(PruneRule)


def keep_counts(
    group_tokens: np.ndarray, num_layers: int, *, retention: float, layer_decay: float | None, prune: str
) -> np.ndarray:
    """Tokens each layer keeps of each group, ``[groups, layers]`` int32: ``⌈ρ_l · n_g⌉``, ``ρ_l = ρ · decay^l``.

    ``n_g`` is the number of real tokens of group ``g`` (the last group may be short). ``prune="none"`` keeps every
    token. The product is rounded to 9 decimals before the ceiling, so ``0.1 · 30`` keeps 3 tokens, not 4.
    """
    n_G = np.asarray(group_tokens, np.int64)
    if prune == PruneRule.NONE:
        return np.repeat(n_G[:, None], num_layers, axis=1).astype(np.int32)
    decay = 1.0 if layer_decay is None else layer_decay
    keep = np.empty((n_G.size, num_layers), np.int32)
    for layer in range(num_layers):
        rho = retention * decay**layer
        for g, n in enumerate(n_G):
            keep[g, layer] = min(int(n), max(1, math.ceil(round(rho * int(n), 9))))
    return keep


@dataclass(frozen=True, eq=False)
class GroupPlan:
    """Token layout, positions and pruning budget of one video, for group-wise prefill.

    Token indices count prompt tokens in order: the prefix is ``[0, P)``, group ``g``'s tokens are
    ``P + g·n + [0, n)`` and the suffix starts at ``P + video_tokens``. Attention is causal by token index, so the
    order survives pruning and compaction of the cache.

    Attributes:
      prefix_ids: ``[P]`` int32, the prompt up to and including ``<|vision_start|>``.
      prefix_positions: ``[3, P]`` int32 M-RoPE positions of the prefix.
      grid: ``(t, h, w)`` of the whole video in vision patches (``video_grid_thw`` of the processor).
      group_frames: frames per group (``G``), a multiple of the temporal patch size.
      num_frames: frames in the video plan (even).
      tokens_per_group: ``n``, LLM tokens of a full group (every group is run with ``n`` tokens).
      group_tokens: ``[groups]`` real tokens of each group (``n`` but for a short last group).
      group_positions: ``[groups, 3, n]`` int32 positions; padding repeats the group's last real position.
      keep: ``[groups, layers]`` int32 tokens of each group kept by each layer.
      text_start: position of the first token after the video (``<|vision_end|>``).
      second_per_grid_t: seconds per temporal patch used for the temporal positions (None for Qwen2-VL).
    """

    prefix_ids: np.ndarray
    prefix_positions: np.ndarray
    grid: tuple[int, int, int]
    group_frames: int
    num_frames: int
    tokens_per_group: int
    group_tokens: np.ndarray
    group_positions: np.ndarray
    keep: np.ndarray
    text_start: int
    second_per_grid_t: float | None

    @property
    def prefix_len(self) -> int:
        return int(self.prefix_ids.size)

    @property
    def num_groups(self) -> int:
        return int(self.group_tokens.size)

    @property
    def video_tokens(self) -> int:
        return int(self.group_tokens.sum())

    @property
    def suffix_start(self) -> int:
        """Token index of the first token after the video."""
        return self.prefix_len + self.video_tokens

    @property
    def memory_tokens(self) -> np.ndarray:
        """``[layers]`` tokens each layer holds after the video: prefix + kept tokens of every group."""
        return self.prefix_len + self.keep.sum(axis=0)

    def group_frame_range(self, group: int) -> tuple[int, int]:
        """``[start, stop)`` of group ``group``'s frames in the frame plan."""
        start = group * self.group_frames
        return start, min(start + self.group_frames, self.num_frames)

    def group_token_index(self, group: int) -> np.ndarray:
        """``[n]`` int32 token indices of a group's slots (padding continues the count; it is masked anyway)."""
        start = self.prefix_len + group * self.tokens_per_group
        return np.arange(start, start + self.tokens_per_group, dtype=np.int32)

    def group_valid(self, group: int) -> np.ndarray:
        """``[n]`` bool, False on the padding of a short last group."""
        return np.arange(self.tokens_per_group) < self.group_tokens[group]

    def text_positions(self, num_tokens: int) -> np.ndarray:
        """``[3, num_tokens]`` int32 positions of text that follows the video (the question suffix, then answers)."""
        return text_position_block(num_tokens, self.text_start)

    def capacity(self, *, ride_along: int = 0, answer: int = 0) -> int:
        """Cache slots every group step needs, and then ``answer`` more tokens after the memory.

        A group step writes all ``n`` new tokens — plus ``ride_along`` question tokens for the question-attention
        rule — behind a layer's memory before compacting the kept ones, so the last group needs
        ``memory before it + n + ride_along`` slots; answering needs ``memory + answer``.
        """
        before_last = self.prefix_len + self.keep[:-1].sum(axis=0)
        during = int(before_last.max()) + self.tokens_per_group + ride_along
        return max(during, int(self.memory_tokens.max()) + answer)


def check_settings(
    config: ModelConfig, *, group_frames: int, retention: float, prune: str, layer_decay: float | None
) -> None:
    """Raise :class:`ConfigError` for QuickPrefill settings no video can satisfy."""
    tp = config.vision.temporal_patch_size
    if prune not in set(PruneRule):
        raise ConfigError(f"prune must be one of {', '.join(PruneRule)}, got {prune!r}")
    if not isinstance(group_frames, int) or group_frames < tp or group_frames % tp:
        raise ConfigError(
            f"group_frames must be a positive multiple of the temporal patch size {tp}, got {group_frames!r}"
        )
    if not 0.0 < retention <= 1.0:
        raise ConfigError(f"retention must lie in (0, 1], got {retention!r}")
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ConfigError(f"layer_decay must lie in (0, 1] or be None, got {layer_decay!r}")


def make_group_plan(
    config: ModelConfig,
    prefix_ids: np.ndarray,
    *,
    num_frames: int,
    height: int,
    width: int,
    sample_fps: float,
    group_frames: int,
    retention: float,
    prune: str,
    layer_decay: float | None = None,
) -> GroupPlan:
    """Plan group-wise prefill of a video of ``num_frames`` frames of ``height`` × ``width`` sampled at
    ``sample_fps``, after the prompt prefix ``prefix_ids`` (ending with ``<|vision_start|>``)."""
    check_settings(config, group_frames=group_frames, retention=retention, prune=prune, layer_decay=layer_decay)
    vision = config.vision
    tp, unit = vision.temporal_patch_size, vision.patch_size * vision.spatial_merge_size
    if num_frames < tp or num_frames % tp:
        raise InputError(f"a video needs a positive multiple of {tp} frames, the plan has {num_frames}")
    if height % unit or width % unit or height <= 0 or width <= 0:
        raise InputError(f"frames of {height}x{width} are not multiples of {unit}; plan them with Qwen's pixel bounds")
    if not sample_fps > 0:
        raise InputError(f"sample_fps must be positive, got {sample_fps!r}")
    prefix = np.asarray(prefix_ids, np.int32).reshape(-1)
    if prefix.size == 0 or prefix[-1] != config.vision_start_token_id:
        raise InputError("the prompt prefix must end with <|vision_start|>")

    merge = vision.spatial_merge_size
    grid = (num_frames // tp, height // vision.patch_size, width // vision.patch_size)
    per_patch = (grid[1] // merge) * (grid[2] // merge)  # LLM tokens of one temporal patch (two frames)
    n = group_frames // tp * per_patch
    num_groups = -(-num_frames // group_frames)
    group_tokens = np.full(num_groups, n, np.int64)
    group_tokens[-1] = (num_frames - (num_groups - 1) * group_frames) // tp * per_patch

    tokens_per_second = config.rope_tokens_per_second
    second_per_grid_t = None if tokens_per_second is None else tp / sample_fps
    video_positions = vision_position_block(
        grid,
        prefix.size,
        spatial_merge_size=merge,
        second_per_grid_t=second_per_grid_t,
        tokens_per_second=tokens_per_second,
    )
    # Pad the whole block to num_groups * n columns by repeating the last real position, then cut it per group.
    padded = np.concatenate(
        [video_positions, np.repeat(video_positions[:, -1:], num_groups * n - video_positions.shape[1], axis=1)], axis=1
    )
    group_positions = padded.reshape(3, num_groups, n).transpose(1, 0, 2).copy()
    keep = keep_counts(group_tokens, config.text.num_layers, retention=retention, layer_decay=layer_decay, prune=prune)
    return GroupPlan(
        prefix_ids=prefix,
        prefix_positions=text_position_block(prefix.size, 0),
        grid=grid,
        group_frames=group_frames,
        num_frames=num_frames,
        tokens_per_group=n,
        group_tokens=group_tokens.astype(np.int32),
        group_positions=group_positions.astype(np.int32),
        keep=keep,
        text_start=int(video_positions.max()) + 1,
        second_per_grid_t=second_per_grid_t,
    )
