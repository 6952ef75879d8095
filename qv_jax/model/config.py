"""Frozen configurations of Qwen2.5-VL and Qwen2-VL, read from Hugging Face ``config.json`` files.

No JAX here: the converter, the CLI and the checkpoint code read configs without touching an accelerator.

Both families share the text decoder (Qwen2 with multimodal RoPE) and differ in the vision tower:

- ``qwen2_5_vl``: RMSNorm + SwiGLU blocks, window attention except in ``fullatt_block_indexes``, RMSNorm merger.
- ``qwen2_vl``: LayerNorm + QuickGELU MLP blocks, full (per-frame) attention everywhere, LayerNorm merger.

Hugging Face has saved these configs in two styles over time and :meth:`ModelConfig.from_hf_config` reads both:
the hub's flat files (text fields at the top level, ``rope_scaling`` + ``rope_theta``) and the transformers 5
layout (a nested ``text_config`` with ``rope_parameters``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from qv_jax.errors import ConfigError

VARIANTS = ("qwen2_5_vl", "qwen2_vl")

# Qwen's special token ids, shared by every released Qwen2-VL and Qwen2.5-VL checkpoint.
QWEN_TOKEN_IDS = {
    "bos_token_id": 151643,  # <|endoftext|>
    "eos_token_ids": (151645,),  # <|im_end|>
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "image_token_id": 151655,
    "video_token_id": 151656,
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower. ``hidden_size`` is the ViT width, ``out_hidden_size`` the merger's output (= LLM width)."""

    variant: str
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    # Qwen2.5-VL only: window side in pixels and the blocks that attend over the whole frame instead (indexes past
    # ``depth`` are ignored, as transformers does).
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    # Qwen2.5-VL: temporal RoPE ticks per second of video (Qwen2-VL has none: one tick per temporal patch).
    tokens_per_second: float = 2.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ConfigError(f"vision variant {self.variant!r} is not one of {VARIANTS}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ConfigError(
                f"vision hidden_size {self.hidden_size} must split into {self.num_heads} heads of a size divisible "
                "by 4 (2D rotary embedding)"
            )
        if self.hidden_act not in ("silu", "quick_gelu", "gelu"):
            raise ConfigError(f"vision hidden_act {self.hidden_act!r} is not supported")
        if self.variant == "qwen2_5_vl":
            unit = self.patch_size * self.spatial_merge_size
            if self.window_size % unit:
                raise ConfigError(f"vision window_size {self.window_size} is not a multiple of {unit}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: channels x temporal patch x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one LLM token."""
        return self.spatial_merge_size**2

    def is_full_attention(self, block: int) -> bool:
        """Whether vision block ``block`` attends over whole frames (True) or within windows (False)."""
        return self.variant == "qwen2_vl" or block in self.fullatt_block_indexes


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder with multimodal RoPE (``mrope_section`` splits the rotary frequencies over t, h, w)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} is odd; rotary embeddings need pairs")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            raise ConfigError(
                f"mrope_section {list(self.mrope_section)} must be three sizes summing to head_dim / 2 = "
                f"{self.head_dim // 2}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"text hidden_act {self.hidden_act!r} is not supported (Qwen2 uses silu)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A whole Qwen2.5-VL / Qwen2-VL model: text decoder, vision tower and the special token ids."""

    variant: str
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = QWEN_TOKEN_IDS["image_token_id"]
    video_token_id: int = QWEN_TOKEN_IDS["video_token_id"]
    vision_start_token_id: int = QWEN_TOKEN_IDS["vision_start_token_id"]
    vision_end_token_id: int = QWEN_TOKEN_IDS["vision_end_token_id"]
    bos_token_id: int | None = QWEN_TOKEN_IDS["bos_token_id"]
    eos_token_ids: tuple[int, ...] = QWEN_TOKEN_IDS["eos_token_ids"]
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ConfigError(f"model variant {self.variant!r} is not one of {VARIANTS}")
        if self.vision.variant != self.variant:
            raise ConfigError(f"vision tower {self.vision.variant!r} does not belong to a {self.variant!r} model")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"vision out_hidden_size {self.vision.out_hidden_size} differs from the text hidden_size "
                f"{self.text.hidden_size}"
            )
        ids = {k: getattr(self, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id")}
        bad = {k: v for k, v in ids.items() if not 0 <= v < self.text.vocab_size}
        if bad:
            raise ConfigError(f"token ids {bad} are outside the vocabulary of {self.text.vocab_size}")

    @property
    def rope_tokens_per_second(self) -> float | None:
        """``tokens_per_second`` for ``rope_index.get_rope_index``: None selects Qwen2-VL's rule (no time scale)."""
        return self.vision.tokens_per_second if self.variant == "qwen2_5_vl" else None

    # ---- serialisation ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; :meth:`from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        try:
            text = TextConfig(**{**d["text"], "mrope_section": tuple(d["text"]["mrope_section"])})
            vision = VisionConfig(
                **{**d["vision"], "fullatt_block_indexes": tuple(d["vision"]["fullatt_block_indexes"])}
            )
            rest = {k: v for k, v in d.items() if k not in ("text", "vision")}
            rest["eos_token_ids"] = tuple(rest.get("eos_token_ids", ()))
            return cls(text=text, vision=vision, **rest)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"not a qv-jax model config: {e}") from e

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | str | os.PathLike) -> ModelConfig:
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
            return _from_hf(config)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{source}: missing or malformed field {e}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """A transformers-5 style ``config.json`` dict (nested ``text_config`` with ``rope_parameters``)."""
        t, v = self.text, self.vision
        text = {
            "model_type": f"{self.variant}_text",
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
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
        }
        vision: dict[str, Any] = {
            "model_type": f"{self.variant}_vision",
            "depth": v.depth,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "hidden_act": v.hidden_act,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        }
        if self.variant == "qwen2_5_vl":
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
        arch = (
            "Qwen2_5_VLForConditionalGeneration" if self.variant == "qwen2_5_vl" else "Qwen2VLForConditionalGeneration"
        )
        return {
            "architectures": [arch],
            "model_type": self.variant,
            "text_config": text,
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": t.tie_word_embeddings,
        }

    # ---- presets --------------------------------------------------------------------------------------------

    @classmethod
    def qwen2_5_vl_3b(cls) -> ModelConfig:
        return cls(
            variant="qwen2_5_vl",
            text=TextConfig(
                vocab_size=151936,
                hidden_size=2048,
                intermediate_size=11008,
                num_layers=36,
                num_heads=16,
                num_kv_heads=2,
                tie_word_embeddings=True,
            ),
            vision=_qwen2_5_vision(out_hidden_size=2048),
        )

    @classmethod
    def qwen2_5_vl_7b(cls) -> ModelConfig:
        return cls(
            variant="qwen2_5_vl",
            text=TextConfig(
                vocab_size=152064,
                hidden_size=3584,
                intermediate_size=18944,
                num_layers=28,
                num_heads=28,
                num_kv_heads=4,
            ),
            vision=_qwen2_5_vision(out_hidden_size=3584),
        )

    @classmethod
    def qwen2_vl_7b(cls) -> ModelConfig:
        return cls(
            variant="qwen2_vl",
            text=TextConfig(
                vocab_size=152064,
                hidden_size=3584,
                intermediate_size=18944,
                num_layers=28,
                num_heads=28,
                num_kv_heads=4,
                max_position_embeddings=32768,
            ),
            vision=VisionConfig(
                variant="qwen2_vl",
                depth=32,
                hidden_size=1280,
                num_heads=16,
                intermediate_size=5120,
                out_hidden_size=3584,
                fullatt_block_indexes=(),
                hidden_act="quick_gelu",
                tokens_per_second=1.0,
            ),
        )

    @classmethod
    def tiny(cls, variant: str = "qwen2_5_vl", *, vocab_size: int = 512, **token_ids: Any) -> ModelConfig:
        """A few-hundred-kilobyte random-weight model for demos and tests; special token ids at the vocab's end."""
        ids = {
            "bos_token_id": vocab_size - 9,
            "eos_token_ids": (vocab_size - 8,),
            "vision_start_token_id": vocab_size - 5,
            "vision_end_token_id": vocab_size - 4,
            "image_token_id": vocab_size - 3,
            "video_token_id": vocab_size - 2,
            "pad_token_id": vocab_size - 9,
        } | token_ids
        text = TextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            mrope_section=(2, 3, 3),
            max_position_embeddings=32768,
        )
        if variant == "qwen2_5_vl":
            vision = VisionConfig(
                variant=variant,
                depth=2,
                hidden_size=32,
                num_heads=2,
                intermediate_size=64,
                out_hidden_size=64,
                window_size=56,
                fullatt_block_indexes=(1,),
            )
        else:
            vision = VisionConfig(
                variant=variant,
                depth=2,
                hidden_size=32,
                num_heads=2,
                intermediate_size=128,
                out_hidden_size=64,
                fullatt_block_indexes=(),
                hidden_act="quick_gelu",
                tokens_per_second=1.0,
            )
        return cls(variant=variant, text=text, vision=vision, **ids)


def _qwen2_5_vision(out_hidden_size: int) -> VisionConfig:
    return VisionConfig(
        variant="qwen2_5_vl",
        depth=32,
        hidden_size=1280,
        num_heads=16,
        intermediate_size=3420,
        out_hidden_size=out_hidden_size,
    )


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


def token_ids(value: Any) -> tuple[int, ...]:
    """``None``, one token id or several (HF files write ``eos_token_id`` either way) as a tuple of ints."""
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, Iterable) else (int(value),)


def _from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
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
