"""Hugging Face Qwen2.5-VL / Qwen2-VL safetensors -> NNX state of ``qv_jax.model.QwenVL`` -> orbax checkpoint.

Two key namings exist in the wild and both load: the hub checkpoints (``visual.*``, ``model.layers.*``,
``lm_head.weight``) and the layout transformers 5 writes (``model.visual.*``, ``model.language_model.*``). Names are
first normalised to the hub naming, then mapped by the regex table :data:`KEY_MAP` to a parameter path and a
layout transform (torch ``Linear`` weights are ``[out, in]``; ours are ``[in, ...]`` with heads split out).

Tensors are streamed from memory-mapped files one at a time, cast to the target dtype and placed on the target
device, so the host never holds a second copy of the model. Every tensor is accounted for: missing, unexpected
and misshaped tensors are collected and reported together in one :class:`~qv_jax.errors.CheckpointError`.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from qv_jax.converters.hf_config import config_from_hf
from qv_jax.converters.safetensors_io import open_checkpoint
from qv_jax.errors import CheckpointError, InputError
from qv_jax.marker import check_output
from qv_jax.model.checkpoint import save_checkpoint
from qv_jax.model.config import ModelConfig
from qv_jax.model.qwen2_5_vl import abstract_model

if TYPE_CHECKING:
    from qv_jax.sharding import ShardingPlan


class TensorLayout(enum.StrEnum):
    """How an HF tensor is laid out relative to our parameter (torch ``Linear`` weights are ``[out, in]``)."""

    SAME = "same"  # identical
    LINEAR = "linear"  # [out, in] -> ours [in, *out split into heads]
    LINEAR_IN = "linear_in"  # [out, in] -> ours [*in split into heads, out] (o_proj, the vision attn.proj)
    SPLIT = "split"  # a flat bias -> ours [*split into heads]
    CONV = "conv"  # Conv3d [E, C, t, p, p] with kernel = stride -> ours [C*t*p*p, E]


_SAME, _LINEAR, _LINEAR_IN, _SPLIT, _CONV = TensorLayout

KEY_MAP: tuple[tuple[str, str, TensorLayout], ...] = (
    (r"visual\.patch_embed\.proj\.weight", "vision.patch_embed", _CONV),
    (r"visual\.blocks\.(\d+)\.norm([12])\.weight", r"vision.blocks.\1.norm\2.scale", _SAME),
    (r"visual\.blocks\.(\d+)\.norm([12])\.bias", r"vision.blocks.\1.norm\2.bias", _SAME),
    (r"visual\.blocks\.(\d+)\.attn\.qkv\.weight", r"vision.blocks.\1.attn.qkv", _LINEAR),
    (r"visual\.blocks\.(\d+)\.attn\.qkv\.bias", r"vision.blocks.\1.attn.qkv_bias", _SPLIT),
    (r"visual\.blocks\.(\d+)\.attn\.proj\.weight", r"vision.blocks.\1.attn.proj", _LINEAR_IN),
    (r"visual\.blocks\.(\d+)\.attn\.proj\.bias", r"vision.blocks.\1.attn.proj_bias", _SAME),
    (r"visual\.blocks\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"vision.blocks.\1.mlp.\2", _LINEAR),
    (r"visual\.blocks\.(\d+)\.mlp\.(gate|up|down)_proj\.bias", r"vision.blocks.\1.mlp.\2_bias", _SAME),
    (r"visual\.blocks\.(\d+)\.mlp\.(fc[12])\.weight", r"vision.blocks.\1.mlp.\2", _LINEAR),
    (r"visual\.blocks\.(\d+)\.mlp\.(fc[12])\.bias", r"vision.blocks.\1.mlp.\2_bias", _SAME),
    (r"visual\.merger\.ln_q\.weight", "vision.merger.norm.scale", _SAME),
    (r"visual\.merger\.ln_q\.bias", "vision.merger.norm.bias", _SAME),
    (r"visual\.merger\.mlp\.0\.weight", "vision.merger.fc1", _LINEAR),
    (r"visual\.merger\.mlp\.0\.bias", "vision.merger.fc1_bias", _SAME),
    (r"visual\.merger\.mlp\.2\.weight", "vision.merger.fc2", _LINEAR),
    (r"visual\.merger\.mlp\.2\.bias", "vision.merger.fc2_bias", _SAME),
    (r"model\.embed_tokens\.weight", "text.embed", _SAME),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight", r"text.layers.\1.\2", _LINEAR),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.bias", r"text.layers.\1.\2_bias", _SPLIT),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"text.layers.\1.o", _LINEAR_IN),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"text.layers.\1.mlp.\2", _LINEAR),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"text.layers.\1.input_norm.scale", _SAME),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"text.layers.\1.post_attention_norm.scale", _SAME),
    (r"model\.norm\.weight", "text.norm.scale", _SAME),
    (r"lm_head\.weight", "text.lm_head", _LINEAR),
)
_COMPILED = tuple((re.compile(pattern), target, layout) for pattern, target, layout in KEY_MAP)

# Buffers some exports include that are recomputed from the config.
_DERIVED = re.compile(r".*(rotary_emb|rotary_pos_emb)\.inv_freq")

Path_ = tuple[str | int, ...]


def normalize_key(name: str) -> str:
    """The hub name of a tensor given in either naming."""
    if name.startswith("model.visual."):
        return name[len("model.") :]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    return name


def map_key(name: str) -> tuple[Path_, TensorLayout] | None:
    """Parameter path and transform for an HF tensor name (either naming), or None if it is not a parameter."""
    hub = normalize_key(name)
    for pattern, target, layout in _COMPILED:
        m = pattern.fullmatch(hub)
        if m:
            path = tuple(int(p) if p.isdigit() else p for p in m.expand(target).split("."))
            return path, layout
    return None


def _fill_groups(pattern: str, values: Sequence[str]) -> str:
    """``pattern`` with its capture groups replaced by ``values`` in order and ``\\.`` unescaped."""
    pieces = re.split(r"\([^)]*\)", pattern)
    out = [pieces[0]]
    for value, piece in zip(values, pieces[1:], strict=True):
        out += [value, piece]
    return "".join(out).replace("\\.", ".")


def hf_name(path: Path_) -> str:
    """The hub name of the HF tensor that fills parameter ``path`` (for error messages)."""
    dotted = ".".join(map(str, path))
    for pattern, target, _ in KEY_MAP:
        # the target template with each back-reference replaced by the capture group it refers to
        group_res = re.findall(r"\([^)]*\)", pattern)
        pieces = re.split(r"\\\\(\d)", re.escape(target))
        reverse = "".join(group_res[int(p) - 1] if i % 2 else p for i, p in enumerate(pieces))
        m = re.fullmatch(reverse, dotted)
        if m:
            return _fill_groups(pattern, m.groups())
    return dotted


def expected_hf_shape(layout: TensorLayout, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape that converts to a parameter of ``shape`` (not for ``CONV``, checked by its rank)."""
    if layout is _SAME:
        return shape
    if layout is _LINEAR:
        return (int(np.prod(shape[1:])), shape[0])
    if layout is _LINEAR_IN:
        return (shape[-1], int(np.prod(shape[:-1])))
    if layout is _SPLIT:
        return (int(np.prod(shape)),)
    raise ValueError(layout)


def convert_tensor(layout: TensorLayout, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """An HF tensor in our layout (a view where possible; the caller casts and copies)."""
    if layout is _SAME:
        return hf
    if layout in (_LINEAR, _LINEAR_IN):  # [out, in] -> [in, out], then split into our shape
        return hf.T.reshape(shape)
    if layout is _SPLIT:
        return hf.reshape(shape)
    if layout is _CONV:
        return hf.reshape(hf.shape[0], -1).T
    raise ValueError(layout)


def to_hf_tensor(layout: TensorLayout, value: np.ndarray, config: ModelConfig) -> np.ndarray:
    """One of our parameters as the HF tensor it came from: the inverse of :func:`convert_tensor`."""
    if layout is _SAME:
        return value
    if layout is _LINEAR:
        return value.reshape(value.shape[0], -1).T
    if layout is _LINEAR_IN:
        return value.reshape(-1, value.shape[-1]).T
    if layout is _SPLIT:
        return value.reshape(-1)
    if layout is _CONV:
        v = config.vision
        return value.T.reshape(value.shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    raise ValueError(layout)


def _shape_ok(layout: TensorLayout, hf_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    if layout is _CONV:
        return len(hf_shape) == 5 and hf_shape[0] == shape[1] and int(np.prod(hf_shape[1:])) == shape[0]
    return hf_shape == expected_hf_shape(layout, shape)


def load_hf_state(
    model_dir: str | os.PathLike,
    config: ModelConfig | None = None,
    dtype="float32",
    *,
    place: Callable[[np.ndarray], jax.Array] | None = None,
    progress: Callable[[str], None] | None = None,
    plan: ShardingPlan | None = None,
) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """Read an HF checkpoint directory into ``(config, graphdef, state)`` of :class:`QwenVL`.

    ``place`` puts each converted numpy tensor where it should live (default: ``jax.device_put`` on the default
    device). With a ``plan`` (``qv_jax.sharding.ShardingPlan``, built for ``config``) every device instead reads
    its own slice of each memory-mapped tensor into its shard, and the result is the plan's running layout
    (``config`` returned is ``plan.config``). Raises :class:`CheckpointError` listing every missing, unexpected
    and misshaped tensor.
    """
    model_dir = Path(model_dir)
    if config is None:
        config = plan.checkpoint_config if plan is not None else config_from_hf(model_dir)
    if plan is not None and (place is not None or plan.checkpoint_config != config):
        raise InputError("load_hf_state: a plan replaces place=, and must be built for the same config")
    dtype = jnp.dtype(dtype)
    place = place or jax.device_put
    graphdef, abstract = abstract_model(config, dtype)
    wanted: dict[Path_, jax.ShapeDtypeStruct] = {
        tuple(path): var.get_value() for path, var in nnx.to_flat_state(abstract)
    }
    files = open_checkpoint(model_dir)
    values: dict[Path_, jax.Array] = {}
    unexpected, misshaped, duplicated = [], [], []
    reported: set[Path_] = set()  # misshaped: listed once, not again as missing
    for name, f in files.items():
        mapped = map_key(name)
        if mapped is None or mapped[0] not in wanted:
            if _DERIVED.fullmatch(name) or (
                config.text.tie_word_embeddings and normalize_key(name) == "lm_head.weight"
            ):
                continue  # recomputed from the config / the tied embedding
            unexpected.append(name)
            continue
        path, layout = mapped
        target = wanted[path]
        hf_shape = f.shape(name)
        if not _shape_ok(layout, hf_shape, tuple(target.shape)):
            want = "[E, C, t, p, p]" if layout is _CONV else list(expected_hf_shape(layout, tuple(target.shape)))
            misshaped.append(f"{name}: {list(hf_shape)}, expected {want}")
            reported.add(path)
            continue
        if path in values:
            duplicated.append(name)
            continue
        if progress:
            progress(name)
        if plan is not None:
            values[path] = plan.place(path, convert_tensor(layout, f.get(name), tuple(target.shape)), dtype)
            continue
        array = np.ascontiguousarray(convert_tensor(layout, f.get(name), tuple(target.shape)).astype(dtype))
        values[path] = place(array)
    missing = [hf_name(p) for p in wanted if p not in values and p not in reported]
    if missing or unexpected or misshaped or duplicated:
        parts = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("misshaped", misshaped),
            ("duplicated (both namings)", duplicated),
        ):
            if items:
                parts.append(f"{len(items)} {label}: " + ", ".join(sorted(items)))
        raise CheckpointError(
            f"{model_dir}: checkpoint does not match the {config.variant} config; " + "; ".join(parts)
        )
    if plan is not None:
        return plan.config, *plan.build(values)
    nnx.replace_by_pure_dict(abstract, traverse_util.unflatten_dict(values))
    return config, graphdef, abstract


def convert(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype="bfloat16",
    *,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Path:
    """Convert an HF model directory into a qv-jax checkpoint (orbax parameters, config, tokenizer files).

    Tensors are converted one at a time, by default onto the host CPU device; with a ``mesh`` (``qv_jax.make_mesh``)
    each goes straight into its shards on the mesh's devices, so no host ever holds the whole model, and orbax
    writes the checkpoint from the shards. The checkpoint is written once all tensors are in place, whole or not at
    all; an output it may not write (``hf_dir`` itself, or an existing directory without ``overwrite``) is refused
    before any tensor is read.
    """
    check_output(out_dir, overwrite=overwrite, inputs=(hf_dir,))
    if mesh is not None:
        from qv_jax.sharding import ShardingPlan

        plan = ShardingPlan.create(config_from_hf(hf_dir), mesh)
        _, _, state = load_hf_state(hf_dir, dtype=dtype, progress=progress, plan=plan)
        return save_checkpoint(
            out_dir, plan.checkpoint_config, plan.checkpoint_state(state), tokenizer_dir=hf_dir, overwrite=overwrite
        )
    cpu = jax.devices("cpu")[0]
    config, _, state = load_hf_state(hf_dir, dtype=dtype, place=lambda a: jax.device_put(a, cpu), progress=progress)
    return save_checkpoint(out_dir, config, state, tokenizer_dir=hf_dir, overwrite=overwrite)
