"""Tiny random models with a tokenizer and short generated videos for the QuickPrefill / VideoQA tests.

Built once per test session (cached): a 2-layer random Qwen2.5-VL with a trained test tokenizer, no torch, and a
5 s 112x112 H.264 clip that samples to 20 frames at 4 fps — 8 LLM tokens per frame at 112x112.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from qv_jax.model.preprocess import patchify
from qv_jax.runtime import VisionLanguageModel
from qv_jax.testing import make_sample_video, tiny_config, write_tokenizer
from qv_jax.video import VideoReader

_ROOT = Path(tempfile.mkdtemp(prefix="qv-jax-pipeline-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)

CONFIG = tiny_config()
SIDE = 112  # frame side after smart_resize: 4x4 merged tokens per temporal patch
# VideoQA keywords that sample the test video to 20 frames of 112x112
VIDEO_OPTIONS = {"fps": 4.0, "min_pixels": SIDE * SIDE, "max_pixels": SIDE * SIDE, "workers": 2}


@functools.cache
def tokenizer_dir() -> Path:
    out = _ROOT / "tokenizer"
    write_tokenizer(out, CONFIG)
    return out


@functools.cache
def tiny_model(seed: int = 1, dtype: str = "float32", variant: str = "qwen2_5_vl") -> VisionLanguageModel:
    from qv_jax.model.tokenizer import Tokenizer

    config = CONFIG if variant == "qwen2_5_vl" else tiny_config(variant)  # same special token ids
    return VisionLanguageModel.random(config, seed=seed, dtype=dtype, tokenizer=Tokenizer.from_dir(tokenizer_dir()))


@functools.cache
def model_dir(seed: int = 1) -> Path:
    """A saved qv-jax checkpoint of :func:`tiny_model` with its tokenizer."""
    out = _ROOT / f"model-{seed}"
    tiny_model(seed).save(out, tokenizer_dir=tokenizer_dir())
    return out


@functools.cache
def sample_video() -> Path:
    return make_sample_video(_ROOT / "clip.mp4", seconds=5, fps=8, size=(SIDE, SIDE), gop=8)


def reference_inputs(model: VisionLanguageModel, video: Path, question: str, frame_plan, grid) -> dict:
    """Whole-prompt ids and processor-style video inputs for the plain model, from the same frames."""
    with VideoReader(video) as reader:
        frames = reader.read(frame_plan).frames
    pixels, pixel_grid = patchify(jnp.asarray(frames), model.config.vision)
    assert tuple(pixel_grid[0]) == tuple(grid)
    prompt = model.tokenizer.video_prompt(question, grid)
    return {
        "input_ids": prompt.input_ids[None],
        "pixel_values_videos": np.asarray(pixels),
        "video_grid_thw": np.array(pixel_grid),
        "second_per_grid_ts": [model.config.vision.temporal_patch_size / frame_plan.sample_fps],
    }
