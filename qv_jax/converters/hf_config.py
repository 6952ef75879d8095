"""Hugging Face ``config.json`` <-> :class:`~qv_jax.model.config.ModelConfig`, in both styles HF has written.

The hub's flat files (text fields at the top level, ``rope_scaling`` + ``rope_theta``) and the transformers 5
layout (a nested ``text_config`` with ``rope_parameters``) both read; :func:`config_to_hf` writes the second.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qv_jax.errors import CheckpointError, ConfigError
from qv_jax.model.config import QWEN_TOKEN_IDS, VARIANTS, ModelConfig, TextConfig, VisionConfig, token_ids

__all__ = ["config_from_hf", "config_to_hf", "generation_defaults"]


def config_from_hf(config: Mapping[str, Any] | str | os.PathLike) -> ModelConfig:
    """Read a Hugging Face Qwen2.5-VL / Qwen2-VL config (a dict, a ``config.json`` path or a model directory)."""
    source = "config"
    if not isinstance(config, Mapping):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        source = path
        try:
            with open(path) as f:
                config = json.load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: no such config file") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
    try:
        return _from_hf_dict(config)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: missing or malformed field {e}") from None


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A transformers-5 style ``config.json`` dict (nested ``text_config`` with ``rope_parameters``)."""
    t, v = config.text, config.vision
    text = {
        "model_type": f"{config.variant}_text",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "hidden_act": t.hidden_act,
        "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": list(t.mrope_section),
            "rope_theta": t.rope_theta,
        },
        "use_sliding_window": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_ids[0] if len(config.eos_token_ids) == 1 else list(config.eos_token_ids),
        "pad_token_id": config.pad_token_id,
    }
    vision: dict[str, Any] = {
        "model_type": f"{config.variant}_vision",
        "depth": v.depth,
        "num_heads": v.num_heads,
        "in_channels": v.in_channels,
        "patch_size": v.patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "temporal_patch_size": v.temporal_patch_size,
        "hidden_act": v.hidden_act,
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }
    if config.variant == "qwen2_5_vl":
        vision |= {
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "out_hidden_size": v.out_hidden_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            # transformers types it as int (the released models use 2)
            "tokens_per_second": int(v.tokens_per_second)
            if float(v.tokens_per_second).is_integer()
            else v.tokens_per_second,
        }
    else:
        if v.intermediate_size % v.hidden_size:
            raise ConfigError("a Qwen2-VL vision MLP width must be a multiple of its hidden size (mlp_ratio)")
        vision |= {
            "embed_dim": v.hidden_size,
            "mlp_ratio": v.intermediate_size // v.hidden_size,
            "hidden_size": v.out_hidden_size,
        }
    arch = "Qwen2_5_VLForConditionalGeneration" if config.variant == "qwen2_5_vl" else "Qwen2VLForConditionalGeneration"
    return {
        "architectures": [arch],
        "model_type": config.variant,
        "text_config": text,
        "vision_config": vision,
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings,
    }


def generation_defaults(model_dir: Path) -> tuple[tuple[int, ...] | None, int | None]:
    """Stop and pad ids from ``generation_config.json``, when the directory has one."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return None, None
    try:
        gen = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    eos = token_ids(gen.get("eos_token_id")) or None
    pad = gen.get("pad_token_id")
    return eos, None if pad is None else int(pad)


def _rope(text: Mapping[str, Any]) -> tuple[float, tuple[int, int, int]]:
    """Rotary theta and M-RoPE sections from either config style."""
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ConfigError(f"rope type {rope_type!r} is not supported (only default / mrope)")
    if "mrope_section" not in rope:
        raise ConfigError("the rope configuration has no mrope_section")
    theta = float(rope.get("rope_theta", text.get("rope_theta", 1000000.0)))
    return theta, tuple(int(s) for s in rope["mrope_section"])


def _from_hf_dict(cfg: Mapping[str, Any]) -> ModelConfig:
    model_type = cfg.get("model_type")
    if model_type not in VARIANTS:
        raise ConfigError(f"model_type {model_type!r} is not a Qwen2.5-VL / Qwen2-VL model ({', '.join(VARIANTS)})")
    # Hub files are flat (text fields at the top level); transformers 5 nests them in text_config.
    text = {**{k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}, **cfg.get("text_config", {})}
    if text.get("use_sliding_window"):
        raise ConfigError("use_sliding_window=true is not supported")
    theta, sections = _rope(text)
    tie = bool(cfg.get("tie_word_embeddings", False) or cfg.get("text_config", {}).get("tie_word_embeddings", False))
    text_cfg = TextConfig(
        vocab_size=int(text["vocab_size"]),
        hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text["intermediate_size"]),
        num_layers=int(text["num_hidden_layers"]),
        num_heads=int(text["num_attention_heads"]),
        num_kv_heads=int(text.get("num_key_value_heads") or text["num_attention_heads"]),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        mrope_section=sections,
        max_position_embeddings=int(text.get("max_position_embeddings", 128000)),
        tie_word_embeddings=tie,
        hidden_act=text.get("hidden_act", "silu"),
    )
    v = cfg.get("vision_config") or {}
    vision_rope = v.get("rope_parameters") or {}
    common = {
        "variant": model_type,
        "depth": int(v.get("depth", 32)),
        "num_heads": int(v.get("num_heads", 16)),
        "patch_size": int(v.get("patch_size", v.get("spatial_patch_size", 14))),
        "temporal_patch_size": int(v.get("temporal_patch_size", 2)),
        "spatial_merge_size": int(v.get("spatial_merge_size", 2)),
        "in_channels": int(v.get("in_channels", v.get("in_chans", 3))),
        "rope_theta": float(vision_rope.get("rope_theta", 10000.0)),
    }
    if model_type == "qwen2_5_vl":
        vision_cfg = VisionConfig(
            **common,
            hidden_size=int(v.get("hidden_size", 3584)),
            intermediate_size=int(v.get("intermediate_size", 3420)),
            out_hidden_size=int(v.get("out_hidden_size", 3584)),
            window_size=int(v.get("window_size", 112)),
            fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", (7, 15, 23, 31))),
            hidden_act=v.get("hidden_act", "silu"),
            tokens_per_second=float(v.get("tokens_per_second", 4)),
        )
    else:
        embed_dim = int(v.get("embed_dim", 1280))
        vision_cfg = VisionConfig(
            **common,
            hidden_size=embed_dim,
            intermediate_size=int(embed_dim * v.get("mlp_ratio", 4)),
            out_hidden_size=int(v.get("hidden_size", 3584)),
            fullatt_block_indexes=(),
            hidden_act=v.get("hidden_act", "quick_gelu"),
            tokens_per_second=1.0,
        )
    ids = {
        k: int(cfg.get(k, text.get(k, QWEN_TOKEN_IDS[k])))
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    }
    bos = text.get("bos_token_id", QWEN_TOKEN_IDS["bos_token_id"])
    pad = text.get("pad_token_id")
    return ModelConfig(
        variant=model_type,
        text=text_cfg,
        vision=vision_cfg,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=token_ids(text.get("eos_token_id", QWEN_TOKEN_IDS["eos_token_ids"][0])),
        pad_token_id=None if pad is None else int(pad),
        **ids,
    )
