"""Saved directories (model checkpoints, video memories): written whole or not at all, and a JSON marker.

A save is written into a hidden temporary sibling of the output and takes the output's place only once complete,
by an atomic exchange of the two directories where the kernel offers one, so an interrupted save leaves the
previous output intact and loadable. An existing output is replaced only if it is empty or carries a qv-jax
marker, and never when it is, or contains, one of the save's inputs; both are checked before any work.

The marker (``qv_jax*.json``) names the format and its version and is written last, so a directory without it is
an unfinished save, never mistaken for a finished one; reading checks both before anything else is read.
See docs/guide.md (Files qv-jax writes).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from qv_jax.errors import CheckpointError, OutputError

MARKER_GLOB = "qv_jax*.json"
PARTIAL = ".qv-jax-partial-"  # infix of the temporary siblings saves are written into
_HINT = "replace it with --overwrite, or overwrite=True in Python"


def is_qv_output(directory: Path) -> bool:
    """Whether ``directory`` holds a qv-jax marker (a JSON object whose format is qv-jax's)."""
    for path in directory.glob(MARKER_GLOB):
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(meta, dict) and str(meta.get("format", "")).startswith("qv-jax-"):
            return True
    return False


def check_output(
    target: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = (), directory: bool = True
) -> Path:
    """``target`` made absolute, once it is known that a save may write it; call before doing any work.

    :class:`~qv_jax.errors.OutputError` when it is (or contains) one of ``inputs``, when it exists as the wrong
    kind of path, or when it exists (a non-empty directory) and ``overwrite`` is false or it is not qv-jax's own.
    """
    out = Path(target).absolute()
    resolved = out.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if source == resolved or resolved in source.parents:
            what = "the input itself" if source == resolved else f"a folder holding the input {source}"
            raise OutputError(out, f"is {what}: refusing to write over it")
    if not out.exists():
        if out.parent.exists() and not out.parent.is_dir():
            raise OutputError(out, f"its parent {out.parent} is a file")
        return out
    if directory != out.is_dir():
        raise OutputError(out, f"exists and is {'a file' if directory else 'a directory'}")
    if not directory:
        if not overwrite:
            raise OutputError(out, f"exists ({_HINT})")
        return out
    if any(out.iterdir()):
        if not overwrite:
            raise OutputError(out, f"directory exists and is not empty ({_HINT})")
        if not is_qv_output(out):
            raise OutputError(out, "is not a directory qv-jax wrote (no qv-jax marker): refusing to replace it")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(out: Path) -> None:
    """Temporary siblings of ``out`` left by saves whose process is gone (killed mid-save)."""
    for path in out.parent.glob(f".{out.name}{PARTIAL}*"):
        pid = path.name.rsplit(PARTIAL, 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _temporary_sibling(out: Path, directory: bool) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    prefix = f".{out.name}{PARTIAL}{os.getpid()}-"
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=out.suffix, dir=out.parent)
    os.close(fd)
    return Path(path)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _move_into_place(partial: Path, out: Path) -> None:
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.is_dir():
        os.replace(partial, out)
        return
    if not _exchange(partial, out):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL}{os.getpid()}-old-", dir=out.parent))
        os.replace(out, old / "previous")
        os.replace(partial, out)
        partial = old
    shutil.rmtree(partial, ignore_errors=True)


@contextmanager
def atomic_output(
    target: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = (), directory: bool = True
) -> Iterator[Path]:
    """Write a directory (or, with ``directory=False``, one file) whole or not at all.

    Yields the temporary sibling to write into; when the block ends without an exception it replaces ``target``
    (checked with :func:`check_output` before and again at the end), otherwise it is removed and ``target`` is
    left as it was.
    """
    inputs = tuple(inputs)
    out = check_output(target, overwrite=overwrite, inputs=inputs, directory=directory)
    partial = _temporary_sibling(out, directory)
    try:
        yield partial
        check_output(out, overwrite=overwrite, inputs=inputs, directory=directory)
        if directory:
            _move_into_place(partial, out)
        else:
            os.replace(partial, out)
    except BaseException:
        _remove(partial)
        raise


def write_marker(directory: Path, name: str, meta: dict) -> None:
    """Write the marker ``name`` (call it last: it declares the save complete)."""
    (directory / name).write_text(json.dumps(meta, indent=2) + "\n")


def read_marker(directory: str | os.PathLike, name: str, *, format: str, version: int, what: str) -> dict:
    """The marker ``name`` of ``directory``, checked to be ``format`` at ``version``.

    :class:`~qv_jax.errors.CheckpointError` when it is missing (``directory`` is not ``what``), not JSON, or of
    another format or version.
    """
    path = Path(directory) / name
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: not {what} ({'a file' if Path(directory).exists() else 'no such path'})")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: not {what} (no {name})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt (not a JSON object)")
    if meta.get("format") != format or meta.get("version") != version:
        raise CheckpointError(
            f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; this qv-jax reads {format!r} "
            f"version {version}"
        )
    return meta
