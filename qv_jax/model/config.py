"""Frozen configurations of Qwen2.5-VL and Qwen2-VL, with the released models as presets.

Both families share the text decoder (Qwen2 with multimodal RoPE) and differ in the vision tower:

- ``qwen2_5_vl``: RMSNorm + SwiGLU blocks, window attention except in ``fullatt_block_indexes``, RMSNorm merger.
- ``qwen2_vl``: LayerNorm + QuickGELU MLP blocks, full (per-frame) attention everywhere, LayerNorm merger.

No JAX here. Hugging Face ``config.json`` files are read by ``qv_jax.converters.hf_config``.
"""

from __future__ import annotations

import dataclasses
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


def _qwen2_5_vision(out_hidden_size: int) -> VisionConfig:
    return VisionConfig(
        variant="qwen2_5_vl",
        depth=32,
        hidden_size=1280,
        num_heads=16,
        intermediate_size=3420,
        out_hidden_size=out_hidden_size,
    )


def token_ids(value: Any) -> tuple[int, ...]:
    """``None``, one token id or several (HF files write ``eos_token_id`` either way) as a tuple of ints."""
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, Iterable) else (int(value),)
