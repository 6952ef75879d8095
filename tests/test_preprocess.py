"""On-device patchify against transformers' image processor and the processors' documented patch order; the
vision tower's window layout against transformers' window index and rotary positions."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from qv_jax.errors import InputError
from qv_jax.model.preprocess import CLIP_MEAN, CLIP_STD, frames_grid, patchify
from qv_jax.model.vision_layout import vision_layout
from qv_jax.testing import tiny_config

VISION = tiny_config().vision


def _frames(t, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), np.uint8)


def _reference_video_patches(frames, tp=2, p=14, m=2):
    """Element by element: token (t, block row, block col, row in block, col in block), vector (c, frame, y, x)."""
    frames = np.concatenate([frames, np.repeat(frames[-1:], -len(frames) % tp, axis=0)])
    x = (frames.astype(np.float64) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    t, h, w, _ = x.shape
    rows = []
    for gt in range(t // tp):
        for bh in range(h // (p * m)):
            for bw in range(w // (p * m)):
                for mh in range(m):
                    for mw in range(m):
                        y0, x0 = (bh * m + mh) * p, (bw * m + mw) * p
                        patch = x[gt * tp : (gt + 1) * tp, y0 : y0 + p, x0 : x0 + p, :]  # [tp, p, p, c]
                        rows.append(patch.transpose(3, 0, 1, 2).reshape(-1))
    return np.stack(rows)


@pytest.mark.parametrize("t", [1, 4, 5])
def test_video_patches_follow_the_processor_order(t):
    frames = _frames(t, 56, 84)
    patches, grid = patchify(jnp.asarray(frames), VISION)
    assert grid == ((-(-t // 2), 4, 6),)
    np.testing.assert_allclose(np.asarray(patches), _reference_video_patches(frames), atol=1e-5)


def test_image_patches_match_transformers_image_processor():
    frames = _frames(3, 84, 56, seed=1)
    ref = Qwen2VLImageProcessorPil()(images=list(frames), do_resize=False, return_tensors="np")
    patches, grid = patchify(jnp.asarray(frames), VISION, as_images=True)
    assert grid == tuple(map(tuple, ref["image_grid_thw"].tolist()))
    np.testing.assert_allclose(np.asarray(patches), ref["pixel_values"], atol=1e-6)
    # an image is a one-frame video (the image processor repeats the frame over the temporal patch)
    video, _ = patchify(jnp.asarray(frames[:1]), VISION)
    np.testing.assert_array_equal(np.asarray(video), np.asarray(patches)[: len(video)])


def test_frames_that_cannot_be_patchified_raise():
    with pytest.raises(InputError, match="multiples of 28"):
        frames_grid((4, 50, 84, 3), VISION)
    with pytest.raises(InputError, match=r"\[T, H, W, 3\]"):
        frames_grid((4, 56, 84), VISION)
    with pytest.raises(InputError, match="at least one frame"):
        frames_grid((0, 56, 84, 3), VISION)


@pytest.mark.parametrize("window_units", [1, 2, 4])
@pytest.mark.parametrize("grid", [((2, 8, 12),), ((1, 4, 4), (3, 6, 10)), ((1, 16, 20), (1, 16, 20))])
def test_window_layout_matches_transformers(grid, window_units):
    g = torch.tensor(grid)
    window_index, cu_windows = get_vision_window_index(
        g, spatial_merge_size=2, window_size=window_units * 28, patch_size=14
    )
    rope_hw = get_vision_position_ids(g, 2).reshape(-1, 4, 2)[window_index].reshape(-1, 2)
    layout = vision_layout(grid, spatial_merge_size=2, window_units=window_units)
    np.testing.assert_array_equal(layout.unit_order, window_index.numpy())
    np.testing.assert_array_equal(layout.rope_hw, rope_hw.numpy())
    np.testing.assert_array_equal(layout.unit_order[layout.unit_restore], np.arange(len(layout.unit_order)))
    # segments (frame, window) change exactly at transformers' window boundaries
    frame = np.concatenate([np.repeat(np.arange(t), h * w) + 1000 * i for i, (t, h, w) in enumerate(grid)])
    key = frame * 100000 + layout.window_ids
    boundaries = np.flatnonzero(np.diff(key)) + 1
    np.testing.assert_array_equal(np.concatenate([[0], boundaries, [len(key)]]), cu_windows.numpy())


def test_frame_runs_batch_frames_of_equal_size():
    layout = vision_layout(((2, 4, 4), (1, 4, 4), (3, 6, 10)), spatial_merge_size=2, window_units=None)
    assert layout.frame_runs == ((0, 3, 16), (48, 3, 60))
    assert not layout.window_ids.any()
