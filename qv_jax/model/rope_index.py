"""Multimodal rotary position ids (M-RoPE) for Qwen2.5-VL and Qwen2-VL, computed on the host (plain numpy).

Every token gets a temporal, a height and a width id. We follow the ORIGINAL Qwen2.5-VL rule the released
checkpoints were trained with — text after a vision block starts at ``max(every position so far) + 1``; a video's
temporal id is ``trunc(i * second_per_grid_t * tokens_per_second)`` in float32 — not transformers 5.x's
(docs/positions.md). ``tokens_per_second=None`` selects Qwen2-VL's rule. Positions exist before any pixel is
decoded, so the group-wise prefill computes them once for the whole unpruned prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qv_jax.errors import InputError

__all__ = [
    "decode_position_ids",
    "get_rope_index",
    "temporal_indices",
    "text_position_block",
    "vision_position_block",
    "vision_token_count",
]

GridTHW = Sequence[int] | np.ndarray


def _grid(grid_thw: GridTHW, spatial_merge_size: int, what: str) -> tuple[int, int, int]:
    """The (t, h, w) of a vision block in LLM tokens: spatial dims divided by the merge size."""
    values = np.asarray(grid_thw).reshape(-1)
    if values.shape != (3,):
        raise InputError(f"{what}: a grid is (t, h, w), got {np.asarray(grid_thw).tolist()}")
    t, h, w = (int(v) for v in values)
    if min(t, h, w) <= 0:
        raise InputError(f"{what}: grid (t, h, w) = {(t, h, w)} has a non-positive dimension")
    if h % spatial_merge_size or w % spatial_merge_size:
        raise InputError(
            f"{what}: grid (t, h, w) = {(t, h, w)} is not divisible by spatial_merge_size={spatial_merge_size}"
        )
    return t, h // spatial_merge_size, w // spatial_merge_size


def vision_token_count(grid_thw: GridTHW, *, spatial_merge_size: int = 2) -> int:
    """How many LLM tokens a vision grid of (t, h, w) patches becomes after the patch merger: t·h·w / merge²."""
    t, h, w = _grid(grid_thw, spatial_merge_size, "grid_thw")
    return t * h * w


def temporal_indices(num_temporal: int, second_per_grid_t: float | None, tokens_per_second: float | None) -> np.ndarray:
    """Temporal position offset of each temporal patch of a vision block, ``[num_temporal]`` int64.

    ``trunc(i * second_per_grid_t * tokens_per_second)`` with both products rounded to float32, as the reference
    computes it (an int64 torch tensor times float32 scalars), so borderline products truncate the same way.
    ``tokens_per_second=None`` is the Qwen2-VL rule: the index itself.
    """
    index = np.arange(num_temporal)
    if tokens_per_second is None:
        return index
    seconds = index.astype(np.float32) * np.float32(second_per_grid_t)
    return (seconds * np.float32(tokens_per_second)).astype(np.int64)


def vision_position_block(
    grid_thw: GridTHW,
    start: int,
    *,
    spatial_merge_size: int = 2,
    second_per_grid_t: float | None = None,
    tokens_per_second: float | None = 2,
    is_image: bool = False,
) -> np.ndarray:
    """Positions ``[3, t·h·w/merge²]`` int32 of one vision block whose first token sits at position ``start``.

    Tokens are in the merger's output order (temporal, then rows, then columns). Row ``0`` is temporal:
    ``start + temporal_indices(...)``; rows ``1`` and ``2`` are ``start + row`` and ``start + column``.
    For a video, ``second_per_grid_t`` defaults to 1.0 as in the reference; images always use temporal offset 0
    (Qwen2.5-VL). The text after the block starts at ``int(block.max()) + 1``.

    The group-wise prefill takes contiguous column slices of one whole-video block: a group's temporal ids come
    from its global temporal index, never from a restart at 0.
    """
    t, h, w = _grid(grid_thw, spatial_merge_size, "grid_thw")
    if tokens_per_second is None:
        if second_per_grid_t is not None:
            raise InputError("second_per_grid_t is given, but tokens_per_second=None selects the Qwen2-VL rule")
        t_index = temporal_indices(t, None, None)
    elif is_image:
        t_index = np.zeros(t, np.int64)
    else:
        t_index = temporal_indices(t, 1.0 if second_per_grid_t is None else second_per_grid_t, tokens_per_second)
    block = np.empty((3, t, h, w), np.int64)
    block[0] = t_index[:, None, None]
    block[1] = np.arange(h)[None, :, None]
    block[2] = np.arange(w)[None, None, :]
    return (block.reshape(3, t * h * w) + start).astype(np.int32)


def text_position_block(length: int, start: int) -> np.ndarray:
    """Positions ``[3, length]`` int32 of ``length`` text tokens starting at ``start``: the same id on all axes."""
    return np.broadcast_to(np.arange(start, start + length, dtype=np.int32), (3, length)).copy()


def decode_position_ids(cache_length: int | np.ndarray, rope_deltas: np.ndarray, num_tokens: int = 1) -> np.ndarray:
    """Positions ``[3, B, num_tokens]`` int32 of the next text tokens after a prefilled prompt.

    A token at cache slot ``s`` (counting padding) has position ``s + rope_delta``: ``rope_deltas [B, 1]`` from
    :func:`get_rope_index`, ``cache_length`` the number of slots already filled (a scalar, or ``[B]`` per row).
    """
    deltas = np.asarray(rope_deltas, np.int64).reshape(-1, 1)
    lengths = np.asarray(cache_length, np.int64).reshape(-1, 1)
    if lengths.shape[0] not in (1, deltas.shape[0]):
        raise InputError(f"cache_length has {lengths.shape[0]} rows but rope_deltas has {deltas.shape[0]}")
    pos_BT = lengths + deltas + np.arange(num_tokens)[None, :]
    return np.broadcast_to(pos_BT, (3, *pos_BT.shape)).astype(np.int32)


def _as_grids(grids: object, name: str) -> np.ndarray:
    if grids is None:
        return np.zeros((0, 3), np.int64)
    array = np.asarray(grids, np.int64)
    if array.ndim != 2 or array.shape[1] != 3:
        raise InputError(f"{name} must have shape [num, 3], got {array.shape}")
    return array


def _text_only_positions(input_ids: np.ndarray, attention_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The reference's branch for prompts without vision grids: 1-D positions over the unpadded tokens."""
    batch, length = input_ids.shape
    if attention_mask is None:
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), (3, batch, length)).copy()
        return positions, np.zeros((batch, 1), np.int32)
    mask = attention_mask.astype(np.int64)
    pos_BT = np.where(mask == 0, 1, np.cumsum(mask, axis=-1) - 1)
    deltas = pos_BT.max(axis=-1, keepdims=True) + 1 - length
    return np.broadcast_to(pos_BT, (3, batch, length)).astype(np.int32), deltas.astype(np.int32)


def get_rope_index(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    second_per_grid_ts: Sequence[float] | np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
    *,
    spatial_merge_size: int = 2,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    tokens_per_second: float | None = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids of a batch of prompts by the original Qwen2.5-VL rule (see the module docstring).

    Args:
      input_ids: ``[B, T]`` token ids; a vision block is ``<|vision_start|>`` followed by exactly
        ``t·h·w/merge²`` image or video pad tokens.
      image_grid_thw / video_grid_thw: ``[N, 3]`` grids of the images / videos in order of appearance, across the
        whole batch (row 0's blocks first), in vision patches as the processor reports them.
      second_per_grid_ts: ``[num_videos]`` seconds covered by one temporal patch of each video
        (``temporal_patch_size / sample_fps``); 1.0 when omitted, as in the reference.
      attention_mask: ``[B, T]``, 0 on padding (left padding for generation).
      tokens_per_second: temporal ids per second of video (``vision_config.tokens_per_second``, 2 for the
        released models); ``None`` selects the Qwen2-VL rule.

    Returns:
      ``position_ids [3, B, T]`` int32 (padding gets 1) and ``rope_deltas [B, 1]`` int32: the next position after
      row ``b`` minus the padded length, so decoding continues at ``cache_length + rope_deltas[b]``.
    """
    ids_BT = np.asarray(input_ids)
    if ids_BT.ndim != 2:
        raise InputError(f"input_ids must have shape [B, T], got {ids_BT.shape}")
    mask_BT = None
    if attention_mask is not None:
        mask_BT = np.asarray(attention_mask)
        if mask_BT.shape != ids_BT.shape:
            raise InputError(f"attention_mask {mask_BT.shape} does not match input_ids {ids_BT.shape}")
    if tokens_per_second is None and second_per_grid_ts is not None:
        raise InputError("second_per_grid_ts is given, but tokens_per_second=None selects the Qwen2-VL rule")
    image_grids = _as_grids(image_grid_thw, "image_grid_thw")
    video_grids = _as_grids(video_grid_thw, "video_grid_thw")
    seconds = None
    if second_per_grid_ts is not None:
        seconds = np.asarray(second_per_grid_ts, np.float64).reshape(-1)
        if seconds.shape[0] != video_grids.shape[0]:
            raise InputError(
                f"second_per_grid_ts has {seconds.shape[0]} entries for {video_grids.shape[0]} videos in video_grid_thw"
            )

    if image_grid_thw is None and video_grid_thw is None:
        for b in range(ids_BT.shape[0]):
            row = ids_BT[b] if mask_BT is None else ids_BT[b][mask_BT[b] != 0]
            if np.isin(row, (image_token_id, video_token_id)).any():
                raise InputError(f"input_ids row {b} holds image or video tokens but no image_grid_thw/video_grid_thw")
        return _text_only_positions(ids_BT, mask_BT)

    batch, length = ids_BT.shape
    position_ids = np.ones((3, batch, length), np.int32)
    deltas = np.zeros((batch, 1), np.int32)
    image_index = video_index = 0
    for b in range(batch):
        keep = np.ones(length, bool) if mask_BT is None else mask_BT[b] != 0
        row = ids_BT[b][keep]
        tokens = row.tolist()
        # Blocks are counted by the token that follows each <|vision_start|>, as the reference does.
        starts = np.flatnonzero(row[:-1] == vision_start_token_id)
        remain_images = int(np.sum(row[starts + 1] == image_token_id))
        remain_videos = int(np.sum(row[starts + 1] == video_token_id))
        pieces: list[np.ndarray] = []
        cursor = next_pos = 0
        for _ in range(remain_images + remain_videos):
            ed_image = _find(tokens, image_token_id, cursor) if remain_images else len(tokens) + 1
            ed_video = _find(tokens, video_token_id, cursor) if remain_videos else len(tokens) + 1
            if ed_image < ed_video:
                if image_index >= len(image_grids):
                    raise InputError(f"input_ids holds more image blocks than the {len(image_grids)} image_grid_thw")
                grid, token, ed, is_image = image_grids[image_index], image_token_id, ed_image, True
                second_per_grid_t = None
                image_index += 1
                remain_images -= 1
            else:
                if video_index >= len(video_grids):
                    raise InputError(f"input_ids holds more video blocks than the {len(video_grids)} video_grid_thw")
                grid, token, ed, is_image = video_grids[video_index], video_token_id, ed_video, False
                second_per_grid_t = None if seconds is None else float(seconds[video_index])
                video_index += 1
                remain_videos -= 1
            what = f"{'image' if is_image else 'video'} in input_ids row {b}"
            count = vision_token_count(grid, spatial_merge_size=spatial_merge_size)
            run = row[ed : ed + count + 1]
            if run.shape[0] < count or (run[:count] != token).any() or (run.shape[0] > count and run[count] == token):
                raise InputError(
                    f"{what}: grid {tuple(int(v) for v in grid)} needs exactly {count} pad tokens at position {ed}, "
                    f"found a run of {_run_length(row, ed, token)}"
                )
            pieces.append(text_position_block(ed - cursor, next_pos))
            block = vision_position_block(
                grid,
                next_pos + ed - cursor,
                spatial_merge_size=spatial_merge_size,
                second_per_grid_t=second_per_grid_t,
                tokens_per_second=tokens_per_second,
                is_image=is_image,
            )
            pieces.append(block)
            next_pos = int(block.max()) + 1
            cursor = ed + count
        pieces.append(text_position_block(len(tokens) - cursor, next_pos))
        row_positions = np.concatenate(pieces, axis=1)
        position_ids[:, b, keep] = row_positions
        next_pos = int(row_positions.max()) + 1 if row_positions.shape[1] else 0
        deltas[b, 0] = next_pos - length
    if image_index != len(image_grids) or video_index != len(video_grids):
        raise InputError(
            f"input_ids hold {image_index} image and {video_index} video blocks, but {len(image_grids)} "
            f"image_grid_thw and {len(video_grids)} video_grid_thw were given"
        )
    return position_ids, deltas


def _find(tokens: list[int], token: int, start: int) -> int:
    try:
        return tokens.index(token, start)
    except ValueError:
        return len(tokens) + 1


def _run_length(row: np.ndarray, start: int, token: int) -> int:
    rest = row[start:] == token
    return int(rest.shape[0] if rest.all() else np.argmin(rest))
