"""The shared frame buffer that workers write decoded frames into, and the clean-up of buffers whose owner died.

A file in ``/dev/shm`` (POSIX shared memory on Linux), mapped by the parent and by each worker. When ``/dev/shm``
is missing or has too little room, the file goes to the temporary directory instead (page-cache backed, still
shared). The parent unlinks the file as soon as the read ends, whatever the outcome; the parent's mapping stays
valid after that, so the returned frames are views of it and need no copy, and the memory is freed when the
last view is dropped.

A process killed outright (SIGKILL, the OOM killer, a power cut of the container) cannot unlink its buffer, so
every buffer is named after its owner: ``qv-jax-PID-START-PIDNS-XXXXXXXX``, with the owner's start time (field 22
of ``/proc/PID/stat``) and pid namespace, which together tell a dead owner from a live one and from a later
process that reuses the pid. Where ``/proc`` is missing (not Linux) the name is ``qv-jax-PID-XXXXXXXX``. The pool
removes dead owners' buffers when it starts and before each buffer it allocates (:func:`remove_stale`);
``qv-jax doctor`` lists them (:func:`leftovers`).
"""

from __future__ import annotations

import atexit
import functools
import math
import mmap
import os
import re
import stat
import tempfile
from dataclasses import dataclass

import numpy as np

SHM_DIR = "/dev/shm"
# Leave this much of /dev/shm, and of the temporary directory's disk, to everyone else.
_RESERVE_BYTES = 64 << 20
# mkstemp's random part is lower-case letters, digits and "_", never "-", so the fields split unambiguously.
_NAME = re.compile(r"qv-jax-(?P<pid>\d+)-(?:(?P<start>\d+)-(?P<ns>\d+)-)?[a-z0-9_]+")

# Paths of this process's buffers not yet unlinked (a stream abandoned unclosed), removed at exit.
_LIVE: set[str] = set()


def _start_time(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot, or None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        # Field 2, the command name, may hold spaces and parentheses: count fields after its closing one.
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _owner_tag(pid: int) -> str:
    start, ns = _start_time(pid), _pid_namespace()
    return f"{pid}-" if start is None or ns is None else f"{pid}-{start}-{ns}-"


_own_tag = functools.cache(_owner_tag)  # keyed by pid, so a forked child gets its own


def buffer_prefix(pid: int | None = None) -> str:
    """File name prefix of the frame buffers of process ``pid`` (default: this one)."""
    own = os.getpid()
    return f"qv-jax-{_own_tag(own) if pid in (None, own) else _owner_tag(pid)}"


def buffer_dirs() -> list[str]:
    """Where frame buffers may be: /dev/shm (where it exists) and the temporary directory."""
    dirs = [SHM_DIR] if os.path.isdir(SHM_DIR) else []
    tmp = tempfile.gettempdir()
    return dirs + ([tmp] if os.path.realpath(tmp) not in map(os.path.realpath, dirs) else [])


@dataclass(frozen=True)
class Leftover:
    """A frame buffer on disk: its ``owner`` pid, size, and ``state``: ``"dead"`` (the owner is provably gone:
    removable), ``"live"`` (in use), or ``"unknown"`` (another pid namespace's, another user's, or a name without a
    start time on a system where pids are ambiguous: never removed)."""

    path: str
    owner: int
    nbytes: int
    state: str
    reason: str


def _exists(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts: signalling it is refused, not unknown)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _owner_state(pid: int, start: int | None, ns: int | None) -> tuple[str, str]:
    here = _pid_namespace()
    if start is None:
        if here is not None:
            return "unknown", "named without a start time, so a reused pid cannot be told from its owner"
        return ("live", f"pid {pid} is running") if _exists(pid) else ("dead", f"pid {pid} is not running")
    if ns != here:
        return "unknown", f"made in another pid namespace ({ns}), whose processes this one cannot see"
    now = _start_time(pid)
    if now is None:
        # No /proc entry: gone, unless /proc hides it from us (hidepid), which os.kill still sees through.
        if not _exists(pid):
            return "dead", f"pid {pid} is not running"
        return "unknown", f"pid {pid} is running but its start time cannot be read"
    if now != start:
        return "dead", f"pid {pid} is now another process (started at tick {now}, the owner at {start})"
    return "live", f"pid {pid} is running"


def leftovers() -> list[Leftover]:
    """Every frame buffer in :func:`buffer_dirs`: regular files with our naming, with their owners' state."""
    found = []
    uid = os.getuid() if hasattr(os, "getuid") else None
    for directory in buffer_dirs():
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            match = _NAME.fullmatch(entry.name)
            if match is None:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # removed meanwhile
            if not stat.S_ISREG(st.st_mode):
                continue  # a link or directory with our naming is not ours to touch
            start, ns = match["start"], match["ns"]
            state, reason = _owner_state(int(match["pid"]), start and int(start), ns and int(ns))
            if uid is not None and st.st_uid != uid and state == "dead":
                state, reason = "unknown", f"owned by another user (uid {st.st_uid}); {reason}"
            found.append(Leftover(entry.path, int(match["pid"]), st.st_size, state, reason))
    return found


def remove_stale(found: list[Leftover] | None = None) -> list[Leftover]:
    """Unlink the buffers of dead owners (among ``found``, default :func:`leftovers`); returns those removed."""
    removed = []
    for leftover in leftovers() if found is None else found:
        if leftover.state != "dead":
            continue
        try:
            os.unlink(leftover.path)
        except OSError:
            continue  # another process's clean-up got there first, or we may not
        removed.append(leftover)
    return removed


def _free_bytes(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _directories(nbytes: int) -> tuple[list[str], list[str]]:
    """The directories with room for ``nbytes``, and why the others were passed over."""
    fits, full = [], []
    for directory in buffer_dirs():
        try:
            free = _free_bytes(directory)
        except OSError as e:
            full.append(f"{directory}: {e.strerror or e}")
            continue
        # A sparse file bigger than the room left maps fine and then kills its writers with SIGBUS.
        if free >= nbytes + _RESERVE_BYTES:
            fits.append(directory)
        else:
            full.append(f"{directory}: {free >> 20} MiB free")
    return fits, full


class FrameBuffer:
    """``count`` frames of ``height`` × ``width`` × 3 bytes, shared with the worker processes by file path."""

    def __init__(self, count: int, height: int, width: int):
        self.shape = (count, height, width, 3)
        self.nbytes = math.prod(self.shape)
        self.path = None
        remove_stale()
        directories, errors = _directories(self.nbytes)
        for directory in directories:
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
            _LIVE.add(path)
            self.frames = np.frombuffer(self._mapping, np.uint8).reshape(self.shape)
            return
        raise MemoryError(f"no room for a {self.nbytes >> 20} MiB frame buffer ({'; '.join(errors)})")

    def unlink(self) -> None:
        """Remove the file (idempotent). The mapping, and arrays viewing it, stay valid."""
        if self.path is not None:
            _LIVE.discard(self.path)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None

    def __enter__(self) -> FrameBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.unlink()


@atexit.register
def _unlink_live() -> None:
    prefix = buffer_prefix()
    for path in list(_LIVE):
        if not os.path.basename(path).startswith(prefix):
            continue  # a forked child's exit: the buffers are its parent's
        try:
            os.unlink(path)
        except OSError:
            pass
