"""Host-side layout of the vision tower's token sequence, computed from grid shapes alone (numpy, no pixels).

The patchifier emits the patches of each image / video in ``(t, h / m, w / m, m, m)`` order (``m`` = spatial
merge size), so every run of ``m * m`` consecutive patches is one *merge unit* that the patch merger turns into a
single LLM token. Qwen2.5-VL then permutes the merge units so that each attention window is contiguous:
frame-major, then window by window (row-major over the window grid), then row-major inside the window. The
permutation never crosses a frame, so after it every frame still occupies one contiguous run of tokens.

Attention in the tower is block-diagonal and is described with segment ids, never with a dense mask:

- window blocks: segment = window number inside the frame;
- full-attention blocks (and every block of Qwen2-VL): each frame (temporal patch) is its own segment, which is
  expressed by batching the frames (all frames with the same token count form one ``[F, P]`` attention batch).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from qv_jax.errors import InputError

Grid = tuple[tuple[int, int, int], ...]


@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Where every patch of one vision call sits after the window permutation.

    Attributes:
        unit_order: ``[U]`` merge-unit permutation (window order <- patchify order), ``U = N / merge_unit``.
        unit_restore: ``[U]`` inverse permutation, applied to the merger's output to restore patchify order.
        rope_hw: ``[N, 2]`` (row, column) of every patch inside its frame, in window order (2D RoPE input).
        window_ids: ``[N]`` window number of every patch inside its frame, in window order.
        frame_runs: ``((start, frames, tokens_per_frame), ...)``: maximal runs of consecutive frames with the same
            token count, the attention batches.
    """

    unit_order: np.ndarray
    unit_restore: np.ndarray
    rope_hw: np.ndarray
    window_ids: np.ndarray
    frame_runs: tuple[tuple[int, int, int], ...]

    @property
    def num_patches(self) -> int:
        return int(self.rope_hw.shape[0])


def check_grid(grid_thw, spatial_merge_size: int) -> Grid:
    """``grid_thw`` as a tuple of int triples, each spatial side a multiple of the merge size."""
    try:
        grid = tuple((int(t), int(h), int(w)) for t, h, w in np.asarray(grid_thw).reshape(-1, 3).tolist())
    except ValueError as e:
        raise InputError(f"grid_thw must be [n, 3] (t, h, w) triples, got {grid_thw!r}") from e
    for t, h, w in grid:
        if t < 1 or h < 1 or w < 1 or h % spatial_merge_size or w % spatial_merge_size:
            raise InputError(
                f"grid (t={t}, h={h}, w={w}) is invalid: sizes must be positive and h, w multiples of the spatial "
                f"merge size {spatial_merge_size}"
            )
    return grid


def grid_tokens(grid: Grid, spatial_merge_size: int) -> int:
    """LLM tokens produced by a grid after the patch merger."""
    return sum(t * h * w for t, h, w in grid) // spatial_merge_size**2


@functools.lru_cache(maxsize=256)
def vision_layout(grid: Grid, *, spatial_merge_size: int, window_units: int | None) -> VisionLayout:
    """The layout for a tuple of ``(t, h, w)`` patch grids.

    ``window_units`` is the window side in merge units (Qwen2.5-VL: ``window_size // patch_size // merge``); None
    means no window permutation (Qwen2-VL), every window id 0.
    """
    m = spatial_merge_size
    orders, hw, windows = [], [], []
    runs: list[list[int]] = []
    unit_offset = patch_offset = 0
    for t, h, w in grid:
        uh, uw = h // m, w // m
        # coordinates of every merge unit in patchify order (t, unit row, unit column)
        ut, ui, uj = (a.reshape(-1) for a in np.meshgrid(np.arange(t), np.arange(uh), np.arange(uw), indexing="ij"))
        if window_units is None:
            order = np.arange(t * uh * uw)
            win = np.zeros(t * uh * uw, np.int32)
        else:
            ws = window_units
            wins_w = -(-uw // ws)
            order = np.lexsort((uj % ws, ui % ws, uj // ws, ui // ws, ut))
            win = ((ui // ws) * wins_w + uj // ws).astype(np.int32)
        orders.append(order + unit_offset)
        # (row, column) of each patch of a unit: units expand to m x m patches, row-major inside the unit
        di, dj = np.divmod(np.arange(m * m), m)
        rows = (ui[:, None] * m + di[None, :])[order].reshape(-1)
        cols = (uj[:, None] * m + dj[None, :])[order].reshape(-1)
        hw.append(np.stack([rows, cols], axis=-1))
        windows.append(np.repeat(win[order], m * m))
        per_frame = h * w
        if runs and runs[-1][2] == per_frame:
            runs[-1][1] += t
        else:
            runs.append([patch_offset, t, per_frame])
        unit_offset += t * uh * uw
        patch_offset += t * per_frame
    unit_order = np.concatenate(orders).astype(np.int32)
    return VisionLayout(
        unit_order=unit_order,
        unit_restore=np.argsort(unit_order).astype(np.int32),
        rope_hw=np.concatenate(hw).astype(np.int32),
        window_ids=np.concatenate(windows).astype(np.int32),
        frame_runs=tuple(tuple(r) for r in runs),
    )
