"""On-device preprocessing: uint8 frames ``[frames, height, width, 3]`` -> normalised, patchified pixel values.

This reproduces transformers' Qwen2-VL video / image processors after their resize step (resizing to multiples of
``patch_size * merge_size`` happens in the video decoder): rescale by 1/255 and normalise with the CLIP mean and
std fused into one float32 affine map (``(x - 255 * mean) / (255 * std)``, as the processors compute it), pad the
frame count to a multiple of ``temporal_patch_size`` by repeating the last frame, then cut patches in the
processor's order — token order ``(t, h / m, w / m, m, m)``, patch vector ``(channel, temporal, row, column)``.

An image is a one-frame video padded the same way (the image processor repeats it ``temporal_patch_size`` times).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qv_jax.errors import InputError
from qv_jax.model.config import VisionConfig
from qv_jax.model.vision_layout import Grid

Array = jax.Array

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, which every Qwen-VL preprocessor config uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def frames_grid(shape: tuple[int, ...], cfg: VisionConfig, *, as_images: bool = False) -> Grid:
    """The patch grid(s) of frames of ``shape = (T, H, W, C)``: one video, or ``T`` images with ``as_images``."""
    if len(shape) != 4 or shape[-1] != cfg.in_channels:
        raise InputError(f"frames must be [T, H, W, {cfg.in_channels}], got {tuple(shape)}")
    t, h, w, _ = shape
    unit = cfg.patch_size * cfg.spatial_merge_size
    if t < 1 or h % unit or w % unit or h == 0 or w == 0:
        raise InputError(
            f"frames of {t}x{h}x{w} cannot be patchified: need at least one frame and height / width multiples of "
            f"{unit} (patch {cfg.patch_size} x merge {cfg.spatial_merge_size}); resize them first"
        )
    gh, gw = h // cfg.patch_size, w // cfg.patch_size
    if as_images:
        return ((1, gh, gw),) * t
    tp = cfg.temporal_patch_size
    return ((-(-t // tp), gh, gw),)


def normalize(frames: Array, mean=CLIP_MEAN, std=CLIP_STD) -> Array:
    """uint8 (or float 0..255) frames -> float32 ``(x / 255 - mean) / std`` with the processors' fused constants."""
    scale = np.float32(255.0)
    mean_C = jnp.asarray(np.asarray(mean, np.float32) * scale)
    std_C = jnp.asarray(np.asarray(std, np.float32) * scale)
    return (frames.astype(jnp.float32) - mean_C) / std_C


def patchify(frames: Array, cfg: VisionConfig, *, as_images: bool = False, mean=CLIP_MEAN, std=CLIP_STD):
    """Frames ``[frames, height, width, 3]`` -> ``(patches [P, C] float32, grid)``, identical to the HF
    processor's pixel values (``C = channels * temporal patch * patch * patch``).

    With ``as_images`` every frame is a separate image (grid ``(1, h, w)`` each); otherwise the frames are one
    video whose frame count is padded to a multiple of ``temporal_patch_size`` with copies of the last frame.
    """
    grid = frames_grid(tuple(frames.shape), cfg, as_images=as_images)
    pixels = normalize(frames, mean, std)  # [frames, height, width, channels]
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.spatial_merge_size
    t, h, w, c = pixels.shape
    if as_images:
        pairs = jnp.broadcast_to(pixels[:, None], (t, tp, h, w, c))
    else:
        pad = -t % tp
        if pad:
            pixels = jnp.concatenate([pixels, jnp.repeat(pixels[-1:], pad, axis=0)], axis=0)
        pairs = pixels.reshape(-1, tp, h, w, c)
    g = pairs.shape[0]  # temporal patches, each [tp, height, width, channels]
    x = pairs.reshape(g, tp, h // (p * m), m, p, w // (p * m), m, p, c)
    # -> (g, h/pm, w/pm, m_h, m_w, c, tp, p_h, p_w)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return x.reshape(g * (h // p) * (w // p), c * tp * p * p), grid
