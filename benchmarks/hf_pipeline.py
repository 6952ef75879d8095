"""What a user runs today instead of qv-jax: Hugging Face transformers' Qwen2.5-VL with qwen-vl-utils' sampling.

One question about one video, as the Qwen2.5-VL model card does it: ``qwen_vl_utils.process_vision_info`` reads
the video (with decord by default, qwen-vl-utils' first choice: it seeks to the sampled frames; torchvision 0.29
no longer has the ``read_video`` its torchvision reader calls) and resizes the frames with ``smart_resize``,
transformers' ``Qwen2VLVideoProcessor`` normalises and patchifies them, and
``model.generate`` encodes the video with the vision tower and prefills and decodes greedily (eager PyTorch,
``attn_implementation="sdpa"``). The prompt is qv-jax's (the same token ids the model card's chat template makes).

Needs ``torchvision``, ``qwen-vl-utils`` and ``decord`` beside the test extra: ``pip install torch==2.14.1
torchvision==0.29.1 qwen-vl-utils decord`` (see docs/benchmarks/e2e.md). Used by ``python -m benchmarks.e2e --hf``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class HFPipeline:
    """The HF model of ``hf_dir`` loaded once (as qv-jax's is), answering a question about a video per call;
    ``tokenizer`` and ``config`` are qv-jax's of the same directory (the prompt, the stop and pad ids)."""

    def __init__(
        self,
        hf_dir: Path,
        tokenizer,
        config,
        *,
        fps: float,
        max_pixels: int | None,
        min_pixels: int | None = None,
        max_frames: int,
        dtype: str,
        reader: str = "decord",
    ):
        import torch
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLVideoProcessor

        # qwen-vl-utils reads the environment when it is imported
        os.environ["FORCE_QWENVL_VIDEO_READER"] = reader
        self.torch = torch
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            hf_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa"
        ).eval()
        self.processor = Qwen2VLVideoProcessor()
        self.tokenizer = tokenizer
        self.stop = {"eos_token_id": list(config.eos_token_ids), "pad_token_id": config.pad_token_id}
        self.video_options = {"fps": fps, "max_frames": max_frames}
        pixels = {"max_pixels": max_pixels, "min_pixels": min_pixels}
        self.video_options |= {name: value for name, value in pixels.items() if value is not None}

    def __call__(self, video: Path, question: str, max_new_tokens: int) -> dict:
        from qwen_vl_utils import process_vision_info

        torch = self.torch
        stages: dict[str, float] = {}
        started = mark = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            stages[name] = now - mark
            mark = now

        messages = [{"role": "user", "content": [{"type": "video", "video": str(video), **self.video_options}]}]
        _, videos, video_kwargs = process_vision_info(messages, return_video_kwargs=True)
        lap("decode")
        inputs = self.processor(videos=videos, return_tensors="pt", do_resize=False, do_sample_frames=False)
        grid = [int(v) for v in inputs["video_grid_thw"][0]]
        ids = self.tokenizer.video_prompt(question, grid).input_ids
        lap("processor")
        fps = video_kwargs.get("fps", [self.video_options["fps"]])
        seconds = [self.processor.temporal_patch_size / f for f in fps]
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=torch.as_tensor(ids[None], dtype=torch.long),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                pixel_values_videos=inputs["pixel_values_videos"].to(self.model.dtype),
                video_grid_thw=inputs["video_grid_thw"],
                second_per_grid_ts=torch.tensor(seconds),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                **self.stop,
            )
        lap("generate")
        return {
            "stages": stages,
            "wall_s": time.perf_counter() - started,
            "token_ids": [int(t) for t in out[0, len(ids) :]],
            "frames": int(videos[0].shape[0]),
            "frame_size": [int(videos[0].shape[2]), int(videos[0].shape[3])],
            "prompt_tokens": len(ids),
        }
