"""Saved directories (model checkpoints, video memories): an output directory made fresh, and a JSON marker file.

The marker names the format and its version and is written last, so a directory without it is an unfinished save,
never mistaken for a finished one; reading checks both before anything else is read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from qv_jax.errors import CheckpointError


def fresh_directory(directory: str | os.PathLike, *, overwrite: bool) -> Path:
    """``directory`` (absolute) created empty: an existing non-empty one is removed with ``overwrite``, refused
    otherwise."""
    out = Path(directory).absolute()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out}: directory exists and is not empty (pass overwrite=True)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_marker(directory: Path, name: str, meta: dict) -> None:
    """Write the marker ``name`` (call it last: it declares the save complete)."""
    (directory / name).write_text(json.dumps(meta, indent=2) + "\n")


def read_marker(directory: str | os.PathLike, name: str, *, format: str, version: int, what: str) -> dict:
    """The marker ``name`` of ``directory``, checked to be ``format`` at ``version``.

    :class:`~qv_jax.errors.CheckpointError` when it is missing (``directory`` is not ``what``), not JSON, or of
    another format or version.
    """
    path = Path(directory) / name
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: not {what} (no {name})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt (not a JSON object)")
    if meta.get("format") != format or meta.get("version") != version:
        raise CheckpointError(
            f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; this qv-jax reads {format!r} "
            f"version {version}"
        )
    return meta
