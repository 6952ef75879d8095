"""Tiny random Hugging Face Qwen2.5-VL / Qwen2-VL models for parity tests (a few hundred kB each).

Weights get noise on top of transformers' init (norm scales ~1 +- 0.1, biases ~0.1) so that a swapped, transposed or
mis-mapped tensor changes the logits visibly; special token ids sit at the top of the small vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

VOCAB = 320
IDS = {
    "bos_token_id": VOCAB - 9,
    "eos_token_id": VOCAB - 8,
    "vision_start_token_id": VOCAB - 5,
    "vision_end_token_id": VOCAB - 4,
    "image_token_id": VOCAB - 3,
    "video_token_id": VOCAB - 2,
}


def hf_config(
    variant: str = "qwen2_5_vl",
    *,
    heads: int = 4,
    kv_heads: int = 2,
    tie: bool = False,
    window: int = 56,
    fullatt: tuple[int, ...] = (1,),
    vision_depth: int = 3,
    layers: int = 2,
    rope_style: str = "rope_scaling",
):
    rope = {"type": "mrope", "mrope_section": [2, 3, 3]}
    text = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "bos_token_id": IDS["bos_token_id"],
        "eos_token_id": IDS["eos_token_id"],
    }
    if rope_style == "rope_scaling":
        text |= {"rope_scaling": rope, "rope_theta": 10000.0}
    else:
        text |= {"rope_parameters": {**rope, "rope_type": "default", "rope_theta": 10000.0}}
    ids = {k: v for k, v in IDS.items() if k not in ("bos_token_id", "eos_token_id")}
    if variant == "qwen2_5_vl":
        vision = {
            "depth": vision_depth,
            "hidden_size": 32,
            "num_heads": 2,
            "intermediate_size": 48,
            "out_hidden_size": 64,
            "window_size": window,
            "fullatt_block_indexes": list(fullatt),
            "tokens_per_second": 2,
        }
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)
    vision = {"depth": vision_depth, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2}
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)


def build_hf_model(config, seed: int = 0):
    """A random HF model in eval mode, float32, with noisy weights."""
    torch.manual_seed(seed)
    cls = Qwen2_5_VLForConditionalGeneration if config.model_type == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.add_(0.03 * torch.randn_like(p))
    return model


def video_prompt(grid, *, before=(5, 6), after=(7, 8, 9), merge: int = 2) -> list[int]:
    """Text, a ``<|vision_start|><|video_pad|>...<|vision_end|>`` block for ``grid``, text."""
    n = int(np.prod(grid)) // merge**2
    block = [IDS["vision_start_token_id"], *[IDS["video_token_id"]] * n, IDS["vision_end_token_id"]]
    return [*before, *block, *after]


def image_block(grid, merge: int = 2) -> list[int]:
    n = int(np.prod(grid)) // merge**2
    return [IDS["vision_start_token_id"], *[IDS["image_token_id"]] * n, IDS["vision_end_token_id"]]


def hf_logits(model, input_ids, positions, **vision) -> np.ndarray:
    """HF float32 logits for numpy inputs, with our M-RoPE positions passed explicitly."""
    kwargs = {k: torch.as_tensor(v) for k, v in vision.items() if v is not None}
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(input_ids), position_ids=torch.as_tensor(positions, dtype=torch.long), **kwargs
        )
    return out.logits.numpy()
