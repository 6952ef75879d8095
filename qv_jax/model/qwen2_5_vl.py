"""Qwen2.5-VL (and Qwen2-VL) in Flax NNX, numerically matching transformers' ``modeling_qwen2_5_vl.py``.

A vision tower and a text decoder joined in :class:`QwenVL`. Each decoder layer runs in three steps —
:meth:`DecoderLayer.project`, a :class:`KVHandler` (stores the keys / values wherever its cache keeps them and
attends), :meth:`DecoderLayer.finish` — so prefill, pruning and sparse decoding swap only the handler. Parameters
carry their ``"model"`` mesh axis (``qv_jax.sharding`` reads it). Letters (docs/architecture.md): B T S D N K G H,
and in this file's einsums V vocabulary, F MLP width, P patches, E vision width, C patch values (channels x
temporal patch x patch x patch), J the three of q / k / v, U merge units, M merge-unit width.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qv_jax.attention import calls
from qv_jax.attention.backends import AttentionConfig
from qv_jax.attention.patterns import HeadPattern
from qv_jax.errors import InputError
from qv_jax.model.config import ModelConfig, TextConfig, VisionConfig
from qv_jax.model.vision_layout import Grid, VisionLayout, vision_layout

Array = jax.Array
MODEL_AXIS = "model"


INIT_STD = 0.02


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, sharding: tuple[str | None, ...], init: str) -> nnx.Param:
    """A parameter initialised like transformers does (normal(0.02) weights, zero biases, unit norm scales).

    The init kind is kept as metadata so :func:`random_state` can redraw the same distribution on the host.
    """
    if init == "normal":
        value = (INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = jnp.ones(shape, dtype)
    return nnx.Param(value, out_sharding=sharding, eager_sharding=False, init=init)


# ---------------------------------------------------------------------------------------------------------------
# Shared layers


class RMSNorm(nnx.Module):
    """``scale * x / rms(x)``, the statistics in float32 as transformers computes them."""

    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = _param(rngs, (dim,), dtype, (None,), "ones")

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * normed.astype(x.dtype)


class LayerNorm(nnx.Module):
    """Qwen2-VL's vision LayerNorm (with bias), computed in float32."""

    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = _param(rngs, (dim,), dtype, (None,), "ones")
        self.bias = _param(rngs, (dim,), dtype, (None,), "zeros")

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def activation(name: str, x: Array) -> Array:
    """The activations the Qwen-VL configs name (``gelu`` is the exact erf form, as torch's default)."""
    if name == "silu":
        return jax.nn.silu(x)
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=False)


class GatedMLP(nnx.Module):
    """SwiGLU MLP ``down(act(gate(x)) * up(x))``; with biases in the Qwen2.5-VL vision tower, without in the LLM."""

    def __init__(self, dim: int, hidden: int, act: str, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.act = act
        self.gate = _param(rngs, (dim, hidden), dtype, (None, MODEL_AXIS), "normal")
        self.up = _param(rngs, (dim, hidden), dtype, (None, MODEL_AXIS), "normal")
        self.down = _param(rngs, (hidden, dim), dtype, (MODEL_AXIS, None), "normal")
        if bias:
            self.gate_bias = _param(rngs, (hidden,), dtype, (MODEL_AXIS,), "zeros")
            self.up_bias = _param(rngs, (hidden,), dtype, (MODEL_AXIS,), "zeros")
            self.down_bias = _param(rngs, (dim,), dtype, (None,), "zeros")
        else:
            self.gate_bias = self.up_bias = self.down_bias = None

    def __call__(self, x_TD: Array) -> Array:
        gate_TF = jnp.einsum("...D,DF->...F", x_TD, self.gate[...])
        up_TF = jnp.einsum("...D,DF->...F", x_TD, self.up[...])
        if self.gate_bias is not None:
            gate_TF = gate_TF + self.gate_bias[...]
            up_TF = up_TF + self.up_bias[...]
        out_TD = jnp.einsum("...F,FD->...D", activation(self.act, gate_TF) * up_TF, self.down[...])
        return out_TD if self.down_bias is None else out_TD + self.down_bias[...]


class PlainMLP(nnx.Module):
    """Qwen2-VL's vision MLP ``fc2(act(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int, act: str, *, dtype, rngs: nnx.Rngs):
        self.act = act
        self.fc1 = _param(rngs, (dim, hidden), dtype, (None, MODEL_AXIS), "normal")
        self.fc1_bias = _param(rngs, (hidden,), dtype, (MODEL_AXIS,), "zeros")
        self.fc2 = _param(rngs, (hidden, dim), dtype, (MODEL_AXIS, None), "normal")
        self.fc2_bias = _param(rngs, (dim,), dtype, (None,), "zeros")

    def __call__(self, x_TD: Array) -> Array:
        h_TF = activation(self.act, jnp.einsum("...D,DF->...F", x_TD, self.fc1[...]) + self.fc1_bias[...])
        return jnp.einsum("...F,FD->...D", h_TF, self.fc2[...]) + self.fc2_bias[...]


def rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _inv_freq(dim: int, theta: float) -> np.ndarray:
    """Rotary inverse frequencies, computed in float32 like transformers."""
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Vision tower


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        E, N, H = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.qkv = _param(rngs, (E, 3, N, H), dtype, (None, None, MODEL_AXIS, None), "normal")
        self.qkv_bias = _param(rngs, (3, N, H), dtype, (None, MODEL_AXIS, None), "zeros")
        self.proj = _param(rngs, (N, H, E), dtype, (MODEL_AXIS, None, None), "normal")
        self.proj_bias = _param(rngs, (E,), dtype, (None,), "zeros")

    def __call__(
        self, x_PE: Array, cos_PH, sin_PH, layout: VisionLayout, windowed: bool, attention: AttentionConfig
    ) -> Array:
        qkv_PJNH = jnp.einsum("PE,EJNH->PJNH", x_PE, self.qkv[...]) + self.qkv_bias[...]
        # rotary embedding in float32, as transformers' apply_rotary_pos_emb_vision
        qk_PJNH = qkv_PJNH[:, :2].astype(jnp.float32)
        qk_PJNH = qk_PJNH * cos_PH[:, None, None] + rotate_half(qk_PJNH) * sin_PH[:, None, None]
        qkv_PJNH = jnp.concatenate([qk_PJNH.astype(x_PE.dtype), qkv_PJNH[:, 2:]], axis=1)
        outs = []
        for start, frames, per_frame in layout.frame_runs:
            # each frame is independent: frames are the batch, a frame's patches its tokens, windows (if any)
            # segment ids inside a frame
            run_BJNTH = (
                qkv_PJNH[start : start + frames * per_frame]
                .reshape(frames, per_frame, 3, *qkv_PJNH.shape[2:])
                .transpose(0, 2, 3, 1, 4)
            )
            segments_BT, pattern = None, calls.DENSE
            if windowed:
                windows = layout.window_ids[start : start + frames * per_frame].reshape(frames, -1)
                segments_BT, pattern = jnp.asarray(windows), window_pattern(windows[0].tobytes())
            out_BNTH = calls.self_attention(
                attention,
                run_BJNTH[:, 0],
                run_BJNTH[:, 1],
                run_BJNTH[:, 2],
                causal=False,
                segment_ids=segments_BT,
                patterns=pattern,
            )
            outs.append(out_BNTH.transpose(0, 2, 1, 3).reshape(frames * per_frame, *out_BNTH.shape[1:2], -1))
        out_PNH = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
        P, N, H = out_PNH.shape
        # one contraction over heads x head dim, against the weights in their stored order (no relayout)
        out_PE = out_PNH.reshape(P, N * H) @ self.proj[...].reshape(N * H, -1)
        return out_PE + self.proj_bias[...]


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        E = cfg.hidden_size
        if cfg.variant == "qwen2_5_vl":
            self.norm1 = RMSNorm(E, cfg.norm_eps, dtype=dtype, rngs=rngs)
            self.norm2 = RMSNorm(E, cfg.norm_eps, dtype=dtype, rngs=rngs)
            self.mlp = GatedMLP(E, cfg.intermediate_size, cfg.hidden_act, bias=True, dtype=dtype, rngs=rngs)
        else:
            self.norm1 = LayerNorm(E, cfg.norm_eps, dtype=dtype, rngs=rngs)
            self.norm2 = LayerNorm(E, cfg.norm_eps, dtype=dtype, rngs=rngs)
            self.mlp = PlainMLP(E, cfg.intermediate_size, cfg.hidden_act, dtype=dtype, rngs=rngs)
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x_PE, cos_PH, sin_PH, layout: VisionLayout, windowed: bool, attention: AttentionConfig):
        x_PE = x_PE + self.attn(self.norm1(x_PE), cos_PH, sin_PH, layout, windowed, attention)
        return x_PE + self.mlp(self.norm2(x_PE))


class PatchMerger(nnx.Module):
    """Norm, then each merge unit of ``m * m`` patches concatenated and mapped to one LLM token by a GELU MLP."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        E, M = cfg.hidden_size, cfg.hidden_size * cfg.merge_unit
        self.unit_width = M
        norm = RMSNorm if cfg.variant == "qwen2_5_vl" else LayerNorm
        self.norm = norm(E, cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.fc1 = _param(rngs, (M, M), dtype, (None, MODEL_AXIS), "normal")
        self.fc1_bias = _param(rngs, (M,), dtype, (MODEL_AXIS,), "zeros")
        self.fc2 = _param(rngs, (M, cfg.out_hidden_size), dtype, (MODEL_AXIS, None), "normal")
        self.fc2_bias = _param(rngs, (cfg.out_hidden_size,), dtype, (None,), "zeros")

    def __call__(self, x_PE: Array) -> Array:
        units_UM = self.norm(x_PE).reshape(-1, self.unit_width)
        h_UM = jax.nn.gelu(units_UM @ self.fc1[...] + self.fc1_bias[...], approximate=False)
        return jnp.einsum("UM,MD->UD", h_UM, self.fc2[...]) + self.fc2_bias[...]


class VisionTower(nnx.Module):
    """Patch embedding, 2D-RoPE ViT blocks (window or per-frame attention) and the patch merger.

    Input: patches ``[P, C]`` in the processor's order for the grids ``grid`` (static); output: one embedding per
    LLM token ``[P / m², D]`` in the same (patchify) order, i.e. the order of the ``<|video_pad|>`` slots.
    """

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embed = _param(rngs, (cfg.patch_dim, cfg.hidden_size), dtype, (None, None), "normal")
        self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, dtype=dtype, rngs=rngs)

    def layout(self, grid: Grid) -> VisionLayout:
        cfg = self.cfg
        window_units = None
        if cfg.variant == "qwen2_5_vl":
            window_units = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
        return vision_layout(grid, spatial_merge_size=cfg.spatial_merge_size, window_units=window_units)

    def __call__(self, patches_PC: Array, grid: Grid, attention: AttentionConfig) -> Array:
        cfg = self.cfg
        layout = self.layout(grid)
        if patches_PC.shape != (layout.num_patches, cfg.patch_dim):
            raise InputError(
                f"pixel values {tuple(patches_PC.shape)} do not match grid {grid}: expected "
                f"({layout.num_patches}, {cfg.patch_dim})"
            )
        kernel_CE = self.patch_embed[...]
        x_PE = jnp.einsum("PC,CE->PE", patches_PC.astype(kernel_CE.dtype), kernel_CE)
        unit = cfg.merge_unit
        x_PE = x_PE.reshape(-1, unit, x_PE.shape[-1])[layout.unit_order].reshape(x_PE.shape)

        inv = _inv_freq(cfg.head_dim // 2, cfg.rope_theta)
        rope_hw = jnp.asarray(layout.rope_hw, jnp.float32)  # [P, 2]: each patch's row and column
        freqs_PH = (rope_hw[:, :, None] * inv).reshape(rope_hw.shape[0], -1)  # [h freqs | w freqs]
        freqs_PH = jnp.concatenate([freqs_PH, freqs_PH], axis=-1)
        cos_PH, sin_PH = jnp.cos(freqs_PH), jnp.sin(freqs_PH)

        for i, block in enumerate(self.blocks):
            x_PE = block(x_PE, cos_PH, sin_PH, layout, not cfg.is_full_attention(i), attention)
        return self.merger(x_PE)[layout.unit_restore]


# patches per cell of the vision windows' block mask: fine enough that a tile never visits far-off windows
WINDOW_BLOCK = 16


@functools.lru_cache(maxsize=64)
def window_pattern(window_ids: bytes, block: int = WINDOW_BLOCK) -> HeadPattern:
    """The attention windows of a frame (int32 window id of each patch, windows contiguous) as a block mask: cell
    ``(i, j)`` is visited when a window holds patches of both blocks. Exact with the window ids as segment ids."""
    ids = np.frombuffer(window_ids, np.int32)
    blocks = -(-ids.size // block)
    cells = np.pad(ids, (0, blocks * block - ids.size), mode="edge").reshape(blocks, block)
    lo, hi = cells.min(axis=1), cells.max(axis=1)
    return HeadPattern.from_block_mask((lo[:, None] <= hi[None, :]) & (lo[None, :] <= hi[:, None]), block)


# ---------------------------------------------------------------------------------------------------------------
# Text decoder


class KVHandler(Protocol):
    """Stores one layer's new keys/values and attends to them (plus whatever memory it keeps).

    Called once per layer, in order, with ``q [B, N, T, H]`` and post-RoPE ``k, v [B, K, T, H]``; returns the
    attention output ``[B, N, T, H]``. Implementations may keep state across layers (e.g. an updated cache).
    """

    def __call__(self, layer: int, q_BNTH: Array, k_BKTH: Array, v_BKTH: Array) -> Array: ...


@dataclasses.dataclass
class ChunkAttention:
    """Causal attention of a chunk over itself alone (a full forward without cache).

    ``segment_ids`` ``[B, T]``: negative = padding, never attended to. ``layer_patterns``: per layer, one
    :class:`HeadPattern` per KV head (or one for all), for hybrid sparse models; ``None`` attends densely.
    """

    segment_ids: Array | None = None
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    layer_patterns: tuple[HeadPattern | tuple[HeadPattern, ...], ...] | None = None

    def __call__(self, layer: int, q_BNTH: Array, k_BKTH: Array, v_BKTH: Array) -> Array:
        patterns = calls.DENSE if self.layer_patterns is None else self.layer_patterns[layer]
        return calls.self_attention(
            self.attention, q_BNTH, k_BKTH, v_BKTH, causal=True, segment_ids=self.segment_ids, patterns=patterns
        )


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary tables for one chunk, ``cos``/``sin`` ``[B, T, H]`` in the activation dtype."""

    cos_BTH: Array
    sin_BTH: Array

    def apply(self, x: Array) -> Array:
        """Rotate queries ``[B, N, T, H]`` or keys ``[B, K, T, H]``."""
        return x * self.cos_BTH[:, None] + rotate_half(x) * self.sin_BTH[:, None]


def mrope(cfg: TextConfig, positions_3BT: Array, dtype) -> Rope:
    """Multimodal RoPE: frequency band ``i`` of ``mrope_section`` rotates by the t, h or w position (``i % 3``)."""
    inv = jnp.asarray(_inv_freq(cfg.head_dim, cfg.rope_theta))
    freqs_3BTh = positions_3BT.astype(jnp.float32)[..., None] * inv
    bands, start = [], 0
    for axis, size in enumerate(cfg.mrope_section):
        bands.append(freqs_3BTh[axis % 3, ..., start : start + size])
        start += size
    freqs_BTh = jnp.concatenate(bands, axis=-1)
    freqs_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
    return Rope(jnp.cos(freqs_BTH).astype(dtype), jnp.sin(freqs_BTH).astype(dtype))


class DecoderLayer(nnx.Module):
    """One Qwen2 decoder layer, in three steps: :meth:`project`, a :class:`KVHandler`, :meth:`finish`."""

    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.input_norm = RMSNorm(D, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.q = _param(rngs, (D, N, H), dtype, (None, MODEL_AXIS, None), "normal")
        self.q_bias = _param(rngs, (N, H), dtype, (MODEL_AXIS, None), "zeros")
        self.k = _param(rngs, (D, K, H), dtype, (None, MODEL_AXIS, None), "normal")
        self.k_bias = _param(rngs, (K, H), dtype, (MODEL_AXIS, None), "zeros")
        self.v = _param(rngs, (D, K, H), dtype, (None, MODEL_AXIS, None), "normal")
        self.v_bias = _param(rngs, (K, H), dtype, (MODEL_AXIS, None), "zeros")
        self.o = _param(rngs, (N, H, D), dtype, (MODEL_AXIS, None, None), "normal")
        self.post_attention_norm = RMSNorm(D, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = GatedMLP(D, cfg.intermediate_size, cfg.hidden_act, bias=False, dtype=dtype, rngs=rngs)

    def project(self, x_BTD: Array, rope: Rope) -> tuple[Array, Array, Array]:
        """Queries ``[B, N, T, H]`` and keys / values ``[B, K, T, H]``; queries and keys carry the rotation."""
        h_BTD = self.input_norm(x_BTD)
        # project to [B, T, heads, H] and move the heads in front afterwards: contracting against the weights in
        # their stored order keeps XLA from relaying out (copying) every weight on each call
        q_BTNH = jnp.einsum("BTD,DNH->BTNH", h_BTD, self.q[...]) + self.q_bias[...]
        k_BTKH = jnp.einsum("BTD,DKH->BTKH", h_BTD, self.k[...]) + self.k_bias[...]
        v_BTKH = jnp.einsum("BTD,DKH->BTKH", h_BTD, self.v[...]) + self.v_bias[...]
        q_BNTH, k_BKTH, v_BKTH = (a.transpose(0, 2, 1, 3) for a in (q_BTNH, k_BTKH, v_BTKH))
        return rope.apply(q_BNTH), rope.apply(k_BKTH), v_BKTH

    def finish(self, x_BTD: Array, attn_BNTH: Array) -> Array:
        """Output projection and residual, then the MLP block."""
        B, N, T, H = attn_BNTH.shape
        # one contraction over heads x head dim, against the weights in their stored order (no relayout)
        attn_flat = attn_BNTH.transpose(0, 2, 1, 3).reshape(B, T, N * H)
        x_BTD = x_BTD + attn_flat @ self.o[...].reshape(N * H, -1)
        return x_BTD + self.mlp(self.post_attention_norm(x_BTD))

    def __call__(self, x_BTD: Array, rope: Rope, kv: KVHandler, layer: int) -> Array:
        q_BNTH, k_BKTH, v_BKTH = self.project(x_BTD, rope)
        return self.finish(x_BTD, kv(layer, q_BNTH, k_BKTH, v_BKTH))


class TextDecoder(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype, (MODEL_AXIS, None), "normal")
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        # a tied model projects with the embedding table and has no head of its own
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else _param(rngs, (cfg.hidden_size, cfg.vocab_size), dtype, (None, MODEL_AXIS), "normal")
        )

    @property
    def dtype(self):
        return self.embed[...].dtype

    def embed_tokens(self, ids_BT: Array) -> Array:
        return jnp.take(self.embed[...], ids_BT, axis=0)

    def rope(self, positions_3BT: Array) -> Rope:
        return mrope(self.cfg, positions_3BT, self.dtype)

    def __call__(self, x_BTD: Array, positions_3BT: Array, kv: KVHandler) -> Array:
        """All layers and the final norm over a chunk of embeddings; returns hidden states ``[B, T, D]``."""
        rope = self.rope(positions_3BT)
        for i, layer in enumerate(self.layers):
            x_BTD = layer(x_BTD, rope, kv, i)
        return self.norm(x_BTD)

    def logits(self, hidden: Array) -> Array:
        """Float32 logits ``[..., V]`` of hidden states ``[..., D]``."""
        if self.lm_head is None:
            out = jnp.einsum("...D,VD->...V", hidden, self.embed[...])
        else:
            out = jnp.einsum("...D,DV->...V", hidden, self.lm_head[...])
        return out.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# The whole model


def scatter_tokens(x_BTD: Array, ids_BT: Array, token_id: int, embeds_ND: Array) -> Array:
    """Replace the embeddings of every ``token_id`` slot, in row-major order, by the rows of ``embeds_ND``."""
    mask_BT = ids_BT == token_id
    index_BT = jnp.cumsum(mask_BT.reshape(-1)).reshape(mask_BT.shape) - 1
    rows_BTD = jnp.take(embeds_ND.astype(x_BTD.dtype), jnp.clip(index_BT, 0, embeds_ND.shape[0] - 1), axis=0)
    return jnp.where(mask_BT[..., None], rows_BTD, x_BTD)


class QwenVL(nnx.Module):
    """Qwen2.5-VL or Qwen2-VL (``config.variant``): vision tower + text decoder.

    Construct with random weights from a config alone (``QwenVL(config, rngs=nnx.Rngs(0))``) or load real weights
    with ``qv_jax.load_model``. Arrays in, arrays out; the jitted step functions live in ``qv_jax.runtime``.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
        attention: AttentionConfig | None = None,
    ):
        self.config = config
        # static (part of the graph definition): steps compile once per attention choice
        self.attention = AttentionConfig() if attention is None else attention
        self.vision = VisionTower(config.vision, dtype=dtype, rngs=rngs)
        self.text = TextDecoder(config.text, dtype=dtype, rngs=rngs)

    def encode_vision(self, patches_PC: Array, grid: Grid) -> Array:
        """Visual token embeddings ``[tokens, D]`` for patchified pixels of the grids ``grid``."""
        return self.vision(patches_PC, grid, self.attention)

    def embed(self, ids_BT: Array, *, image_embeds: Array | None = None, video_embeds: Array | None = None) -> Array:
        """Token embeddings with visual embeddings scattered into the ``<|image_pad|>`` / ``<|video_pad|>`` slots."""
        x_BTD = self.text.embed_tokens(ids_BT)
        if image_embeds is not None and image_embeds.shape[0]:
            x_BTD = scatter_tokens(x_BTD, ids_BT, self.config.image_token_id, image_embeds)
        if video_embeds is not None and video_embeds.shape[0]:
            x_BTD = scatter_tokens(x_BTD, ids_BT, self.config.video_token_id, video_embeds)
        return x_BTD


def with_attention(graphdef: nnx.GraphDef, state: nnx.State, attention: AttentionConfig) -> nnx.GraphDef:
    """``graphdef`` of the same model running its attention as ``attention`` says (no array is copied)."""
    model = nnx.merge(graphdef, state)
    model.attention = attention
    return nnx.split(model)[0]


def abstract_model(
    config: ModelConfig, dtype=jnp.float32, attention: AttentionConfig | None = None
) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and shape-only state (``ShapeDtypeStruct`` leaves) of a model; allocates no weights."""
    return nnx.split(nnx.eval_shape(lambda: QwenVL(config, dtype=dtype, rngs=nnx.Rngs(0), attention=attention)))


def random_state(
    config: ModelConfig,
    dtype=jnp.float32,
    seed: int = 0,
    *,
    place: Callable[[tuple[str | int, ...], np.ndarray], Array] | None = None,
) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and random weights drawn on the host with numpy, with the initialisers' distributions.

    Much faster than constructing :class:`QwenVL` eagerly or under ``jit`` on CPU, where every parameter's random
    draw is a separately compiled XLA computation. ``place(path, host_value)`` puts each tensor where it should
    live (default: the default device), e.g. in its shards on a mesh.
    """
    graphdef, state = abstract_model(config, dtype)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(state):
        spec, init = var.get_value(), var.get_metadata()["init"]
        if init == "normal":
            value = INIT_STD * rng.standard_normal(spec.shape, dtype=np.float32)
        else:
            value = np.full(spec.shape, 1.0 if init == "ones" else 0.0, np.float32)
        value = value.astype(spec.dtype)
        var.set_value(jnp.asarray(value) if place is None else place(tuple(path), value))
    return graphdef, state
