"""The shared frame buffer that workers write decoded frames into.

A file in ``/dev/shm`` (POSIX shared memory on Linux), mapped by the parent and by each worker. When ``/dev/shm``
is missing or has too little room, the file goes to the temporary directory instead (page-cache backed, still
shared). The parent unlinks the file as soon as the read ends, whatever the outcome; the parent's mapping stays
valid after that, so the returned frames are views of it and need no copy, and the memory is freed when the
last view is dropped.
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile

import numpy as np

SHM_DIR = "/dev/shm"
# Leave this much of /dev/shm to everyone else.
_SHM_RESERVE_BYTES = 64 << 20


def buffer_prefix() -> str:
    """File name prefix of this process's frame buffers."""
    return f"qv-jax-{os.getpid()}-"


def _free_bytes(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _directories(nbytes: int) -> list[str]:
    candidates = []
    if os.path.isdir(SHM_DIR):
        try:
            if _free_bytes(SHM_DIR) >= nbytes + _SHM_RESERVE_BYTES:
                candidates.append(SHM_DIR)
        except OSError:
            pass
    candidates.append(tempfile.gettempdir())
    return candidates


class FrameBuffer:
    """``count`` frames of ``height`` × ``width`` × 3 bytes, shared with the worker processes by file path."""

    def __init__(self, count: int, height: int, width: int):
        self.shape = (count, height, width, 3)
        self.nbytes = math.prod(self.shape)
        errors = []
        for directory in _directories(self.nbytes):
            fd, path = tempfile.mkstemp(prefix=buffer_prefix(), dir=directory)
            try:
                os.ftruncate(fd, self.nbytes)
                self._mapping = mmap.mmap(fd, self.nbytes)
            except OSError as e:
                errors.append(f"{directory}: {e}")
                os.unlink(path)
                continue
            finally:
                os.close(fd)
            self.path = path
            self.frames = np.frombuffer(self._mapping, np.uint8).reshape(self.shape)
            return
        raise MemoryError(f"cannot allocate a {self.nbytes}-byte frame buffer: {'; '.join(errors)}")

    def unlink(self) -> None:
        """Remove the file (idempotent). The mapping, and arrays viewing it, stay valid."""
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None

    def __enter__(self) -> FrameBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.unlink()
