"""qv-jax's own checkpoint format: an orbax checkpoint of the NNX parameters plus the config and tokenizer files.

Layout of a checkpoint directory::

    qv_jax.json     {"format": "qv-jax-checkpoint", "version": 1, "dtype": ..., "config": ModelConfig.to_dict()}
    params/         orbax (StandardCheckpointer) checkpoint of the parameters as a pure dict
    config.json     the same config in transformers' layout, for tools that read HF directories; a model with a
                    sparsity config (e.g. a LongGen hybrid) also has it there, as ``"qv_jax_sparsity"``
    tokenizer.json, tokenizer_config.json, generation_config.json, ...   copied from the source, when present

Restoring casts to the requested dtype and places arrays on the requested device (or shardings) as orbax reads
them, so a bfloat16 checkpoint can be loaded as float32 and vice versa.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from qv_jax.attention.sparsity import SparsityConfig
from qv_jax.converters.hf_config import config_to_hf
from qv_jax.errors import CheckpointError, ConfigError
from qv_jax.marker import atomic_output, read_marker, write_marker
from qv_jax.model.config import ModelConfig
from qv_jax.model.qwen2_5_vl import abstract_model

FORMAT = "qv-jax-checkpoint"
VERSION = 1
MARKER = "qv_jax.json"
# the config.json entry holding the model's SparsityConfig.to_dict()
SPARSITY_KEY = "qv_jax_sparsity"

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
    inputs: tuple[str | os.PathLike, ...] = (),
    sparsity: SparsityConfig | None = None,
) -> Path:
    """Write ``state`` (of :class:`~qv_jax.model.QwenVL`) and ``config`` as a checkpoint directory, whole or not at
    all (:func:`qv_jax.marker.atomic_output`); ``tokenizer_dir`` and ``inputs`` are never replaced by it.

    ``sparsity`` (in the head order of ``state``) goes into ``config.json`` so the model loads with it.
    """
    params = nnx.to_pure_dict(state)
    leaves = jax.tree.leaves(params)
    dtype = str(jnp.dtype(leaves[0].dtype)) if leaves else "float32"
    sources = (*inputs, *(() if tokenizer_dir is None else (tokenizer_dir,)))
    with atomic_output(out_dir, overwrite=overwrite, inputs=sources) as partial:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(partial / "params", params)
        checkpointer.wait_until_finished()
        hf = config_to_hf(config)
        if sparsity is not None:
            hf[SPARSITY_KEY] = sparsity.to_dict()
        (partial / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, partial)
        meta = {"format": FORMAT, "version": VERSION, "dtype": dtype, "config": config.to_dict()}
        write_marker(partial, MARKER, meta)
    return Path(out_dir).absolute()


def _flat(tree) -> list[tuple[tuple[str, ...], object]]:
    """Leaves by path of names (orbax stores integer keys as strings)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), leaf) for path, leaf in leaves]


def _drop_orbax_leftovers() -> None:
    """When a restore fails, orbax's abandoned coroutines and callbacks report themselves as they are collected
    ("Exception ignored in ...", dozens of lines around the one error that says it all): drop those reports."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_orbax_leftovers", False):
        return

    def hook(unraisable) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
            unraisable.exc_value
        )
        if closed_loop or "orbax" in getattr(code, "co_filename", ""):
            return
        previous(unraisable)

    hook.drops_orbax_leftovers = True
    sys.unraisablehook = hook
    # and asyncio's "Task exception was never retrieved" about orbax's tasks
    logging.getLogger("asyncio").addFilter(lambda record: "orbax" not in record.getMessage())


def restore_arrays(directory: Path, target, what: str):
    """orbax's restore of ``target`` (a tree of ShapeDtypeStructs) from ``directory``, with every failure as a
    CheckpointError naming it: a missing or damaged data file (orbax raises bare ``Exception`` s), or arrays of
    other shapes than ``target`` (checked first, so no restore is left half-run to print noise at exit)."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory.parent}: cannot restore the {what}: {directory.name}/ is missing")
    _drop_orbax_leftovers()  # a failing restore reports from orbax's threads even before it raises
    checkpointer = ocp.StandardCheckpointer()
    try:
        stored = checkpointer.metadata(directory)
        stored = getattr(stored, "item_metadata", stored)
        stored = dict(_flat(getattr(stored, "tree", stored)))
        for key, want in _flat(target):
            have = stored.get(key)
            if have is None or tuple(have.shape) != tuple(want.shape):
                found = "missing" if have is None else f"of shape {tuple(have.shape)}"
                raise CheckpointError(
                    f"{directory}: array {'/'.join(key)} is {found}, expected {tuple(want.shape)} "
                    f"(the {what} do not match their description: edited or mixed files)"
                )
        return checkpointer.restore(directory, target)
    except CheckpointError:
        raise
    except Exception as e:  # orbax and tensorstore raise untyped errors for damaged files
        cause = str(e).strip().splitlines()[0].split(" See full TensorStore details")[0] or type(e).__name__
        raise CheckpointError(f"{directory}: cannot restore the {what} (damaged or incomplete: {cause})") from e


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, str]:
    """``(config, stored dtype name)`` of a checkpoint directory."""
    meta = read_marker(path, MARKER, format=FORMAT, version=VERSION, what="a qv-jax checkpoint")
    return ModelConfig.from_dict(meta["config"]), meta.get("dtype", "float32")


def read_sparsity(path: str | os.PathLike) -> SparsityConfig | None:
    """The sparsity config saved in a model directory's ``config.json`` (``None`` if it has none)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    try:
        entry = json.loads(file.read_text()).get(SPARSITY_KEY)
        return None if entry is None else SparsityConfig.from_dict(entry)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, ConfigError) as e:
        raise CheckpointError(f"{file}: cannot read its {SPARSITY_KEY!r} entry: {e}") from None


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
    restored = restore_arrays(path / "params", target, "parameters")
    nnx.replace_by_pure_dict(abstract, restored)
    return config, graphdef, abstract
