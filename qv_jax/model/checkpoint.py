"""qv-jax's own checkpoint format: an orbax checkpoint of the NNX parameters plus the config and tokenizer files.

Layout of a checkpoint directory::

    qv_jax.json     {"format": "qv-jax-checkpoint", "version": 1, "dtype": ..., "config": ModelConfig.to_dict()}
    params/         orbax (StandardCheckpointer) checkpoint of the parameters as a pure dict
    config.json     the same config in transformers' layout, for tools that read HF directories
    tokenizer.json, tokenizer_config.json, generation_config.json, ...   copied from the source, when present

Restoring casts to the requested dtype and places arrays on the requested device (or shardings) as orbax reads
them, so a bfloat16 checkpoint can be loaded as float32 and vice versa.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from qv_jax.converters.hf_config import config_to_hf
from qv_jax.errors import CheckpointError
from qv_jax.marker import fresh_directory, read_marker, write_marker
from qv_jax.model.config import ModelConfig
from qv_jax.model.qwen2_5_vl import abstract_model

FORMAT = "qv-jax-checkpoint"
VERSION = 1
MARKER = "qv_jax.json"

# Files of an HF model directory that a checkpoint carries along (tokenizer, chat template, generation defaults).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a qv-jax checkpoint directory."""
    return (Path(path) / MARKER).is_file()


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy whichever :data:`TOKENIZER_FILES` exist in ``src`` to ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def save_checkpoint(
    out_dir: str | os.PathLike,
    config: ModelConfig,
    state: nnx.State,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``state`` (of :class:`~qv_jax.model.QwenVL`) and ``config`` as a checkpoint directory."""
    out = fresh_directory(out_dir, overwrite=overwrite)
    params = nnx.to_pure_dict(state)
    leaves = jax.tree.leaves(params)
    dtype = str(jnp.dtype(leaves[0].dtype)) if leaves else "float32"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out / "params", params)
    checkpointer.wait_until_finished()
    (out / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    write_marker(out, MARKER, {"format": FORMAT, "version": VERSION, "dtype": dtype, "config": config.to_dict()})
    return out


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, str]:
    """``(config, stored dtype name)`` of a checkpoint directory."""
    meta = read_marker(path, MARKER, format=FORMAT, version=VERSION, what="a qv-jax checkpoint")
    return ModelConfig.from_dict(meta["config"]), meta.get("dtype", "float32")


def load_checkpoint(
    path: str | os.PathLike,
    dtype=None,
    *,
    sharding: jax.sharding.Sharding | Callable[[tuple, jax.ShapeDtypeStruct], jax.sharding.Sharding] | None = None,
) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """Restore ``(config, graphdef, state)`` from a checkpoint, cast to ``dtype`` (default: as stored).

    ``sharding`` places every array (default: the default device), or says per parameter where it goes:
    ``sharding(path, shape_dtype) -> Sharding``; orbax then reads each device's slice straight into it.
    """
    path = Path(path).absolute()
    config, stored = read_config(path)
    dtype = jnp.dtype(dtype or stored)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    where = sharding if callable(sharding) else (lambda _path, _shape: sharding)
    graphdef, abstract = abstract_model(config, dtype)
    target = jax.tree_util.tree_map_with_path(
        lambda keys, s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where(tuple(k.key for k in keys), s)),
        nnx.to_pure_dict(abstract),
    )
    try:
        restored = ocp.StandardCheckpointer().restore(path / "params", target)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot restore parameters ({type(e).__name__}: {e})") from e
    nnx.replace_by_pure_dict(abstract, restored)
    return config, graphdef, abstract
