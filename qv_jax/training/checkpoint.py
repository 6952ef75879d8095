"""Training checkpoints: a pytree of arrays saved with orbax as ``DIR/step_N``, written whole or not at all.

orbax writes each save into a temporary directory and renames it when finished, so a save interrupted midway
leaves no ``step_N`` and the previous one loadable; only once the new one is whole are older ones removed.
Shared by the finetuning loop (:mod:`qv_jax.training`) and DuoAttention's gate training (:mod:`qv_jax.duo`).
See docs/training.md.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax

from qv_jax.errors import CheckpointError

STEP_PREFIX = "step_"


def checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints in ``directory``, oldest first (none if it does not exist)."""
    directory = Path(directory)
    found = []
    for path in directory.glob(f"{STEP_PREFIX}*") if directory.is_dir() else ():
        number = path.name[len(STEP_PREFIX) :]
        if number.isdigit() and path.is_dir():
            found.append((int(number), path))
    return sorted(found)


def save(directory: str | os.PathLike, step: int, tree) -> Path:
    """``tree`` (a pytree of arrays) as the checkpoint of ``step``; older ones are removed once it is whole."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{STEP_PREFIX}{step}"
    checkpointer = ocp.StandardCheckpointer()
    # orbax writes into a temporary directory and renames it when finished
    checkpointer.save(target, tree, force=True)
    checkpointer.wait_until_finished()
    for number, path in checkpoints(directory):
        if number != step:
            shutil.rmtree(path, ignore_errors=True)
    return target


def restore(directory: str | os.PathLike, like):
    """``(step, tree)`` of the newest checkpoint in ``directory``, shaped and placed like ``like`` (arrays or
    ``ShapeDtypeStruct`` leaves, shardings included), or ``None`` if it has none; :class:`CheckpointError` if
    it does not fit (another model, optimizer or run)."""
    import orbax.checkpoint as ocp

    found = checkpoints(Path(directory).absolute())
    if not found:
        return None
    step, path = found[-1]
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like
    )
    try:
        restored = ocp.StandardCheckpointer().restore(path, abstract)
    except Exception as e:  # orbax raises untyped errors for a tree or shapes that do not match
        raise CheckpointError(f"{path}: cannot resume from it ({type(e).__name__}: {e})") from e
    return step, restored
