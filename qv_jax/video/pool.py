"""A persistent pool of decoder worker processes, and the loop that runs one read's intervals on it.

Workers are fresh interpreters (``python -m qv_jax.video._worker``, i.e. spawned, never forked), so they are safe
to start after JAX has started threads, and they import PyAV and numpy only. The pool is created on first use and
shared by every reader in the process: a read checks workers out, returns them when it ends, and idle workers
wait for the next read. A worker that crashes or hangs is killed and replaced by a fresh one on demand.

Everything a worker needs travels over its socket as pickled messages (never on a command line), and its frames
go to a shared file-backed buffer (see :mod:`qv_jax.video.buffer`).
"""

from __future__ import annotations

import atexit
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait

import numpy as np

from qv_jax.errors import DecodeWorkerError
from qv_jax.video.buffer import remove_stale

START_TIMEOUT_S = 120.0  # a cold interpreter importing PyAV on a busy machine
CANCEL_TIMEOUT_S = 5.0  # a worker checks for cancellation between packets; one packet never takes this long
# Longest single wait for worker messages. Python runs signal handlers only in the main thread, and a Ctrl-C the
# kernel hands to another thread (prefetch runs one) does not wake the main thread's wait: waking up this often
# lets KeyboardInterrupt through promptly anyway.
POLL_S = 0.2

_task_ids = itertools.count()


def cpu_limit() -> int:
    """CPUs this process may run on (its affinity mask where the system has one, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cap_workers(requested: int | None) -> tuple[int, str | None]:
    """Decoder processes for a request (None: one per usable CPU), never more than :func:`cpu_limit`: more would
    only share the same CPUs at the cost of their memory. Returns the count and, when the request was cut, a
    one-line note saying so. (A read also uses no more workers than it has intervals.)"""
    limit = cpu_limit()
    if requested is None or requested <= limit:
        return requested or limit, None
    return limit, f"{requested} decoder workers asked for, but this process may use {limit} CPUs: using {limit}"


def new_task_id() -> int:
    """A task id unique in this process, so a worker's late messages about an old task are recognised."""
    return next(_task_ids)


def _exit_reason(returncode: int | None) -> str:
    if returncode is None:
        return "closed its connection"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of shared memory?)" if name == "SIGBUS" else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {returncode}"


class WorkerStartError(RuntimeError):
    """A decoder process died or stayed silent while starting."""


class WorkerProcess:
    """One decoder process and our end of its socket."""

    def __init__(self):
        ours, theirs = socket.socketpair()
        fd = theirs.fileno()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qv_jax.video._worker", str(fd)],
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C goes to us; we stop the workers
            )
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.pid = self.proc.pid
        self.ready = False
        self.task: dict | None = None
        self.last_heard = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, deadline: float) -> None:
        while not self.ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.conn.poll(remaining):
                raise WorkerStartError(f"decoder worker pid {self.pid} did not start within {START_TIMEOUT_S:g} s")
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                raise WorkerStartError(f"decoder worker pid {self.pid} {self.exit_reason()} while starting") from None
            self.ready = message[0] == "ready"
        self.last_heard = time.monotonic()

    def exit_reason(self) -> str:
        try:
            returncode = self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            returncode = None
        return _exit_reason(returncode)

    def send(self, message: tuple) -> None:
        self.conn.send(message)

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
        self.proc.wait()
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
            self.proc.wait(timeout=2.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class WorkerPool:
    """Idle decoder processes, shared by every reader of this process."""

    def __init__(self):
        self._lock = threading.Lock()
        self._idle: list[WorkerProcess] = []
        self._busy: set[WorkerProcess] = set()
        self.owner_pid = os.getpid()  # a forked child must not drive its parent's workers
        remove_stale()  # frame buffers of earlier runs that were killed outright

    def prestart(self, count: int) -> None:
        """Start processes (without waiting for them) until ``count`` are idle or starting."""
        with self._lock:
            self._idle = [w for w in self._idle if w.alive]
            while len(self._idle) < count:
                self._idle.append(WorkerProcess())

    def acquire(self, count: int) -> list[WorkerProcess]:
        """Check out ``count`` started workers, starting new ones as needed."""
        with self._lock:
            self._idle = [w for w in self._idle if w.alive]
            taken, self._idle = self._idle[:count], self._idle[count:]
            while len(taken) < count:
                taken.append(WorkerProcess())
            self._busy.update(taken)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            for worker in taken:
                worker.wait_ready(deadline)
        except WorkerStartError:
            for worker in taken:
                self.discard(worker)
            raise
        return taken

    def release(self, worker: WorkerProcess) -> None:
        with self._lock:
            self._busy.discard(worker)
            if worker.alive:
                worker.task = None
                self._idle.append(worker)
                return
        worker.kill()

    def replace(self, worker: WorkerProcess) -> WorkerProcess:
        """Kill a checked-out ``worker`` and check out a newly started process in its place."""
        fresh = WorkerProcess()
        with self._lock:
            self._busy.discard(worker)
            self._busy.add(fresh)
        worker.kill()
        try:
            fresh.wait_ready(time.monotonic() + START_TIMEOUT_S)
        except WorkerStartError:
            self.discard(fresh)
            raise
        return fresh

    def discard(self, worker: WorkerProcess) -> None:
        with self._lock:
            self._busy.discard(worker)
        worker.kill()

    def pids(self, busy: bool | None = None) -> list[int]:
        """Process ids of the pool's workers: all, or only the busy (True) or idle (False) ones."""
        with self._lock:
            groups = {True: list(self._busy), False: list(self._idle)}
        workers = groups[True] + groups[False] if busy is None else groups[busy]
        return [w.pid for w in workers]

    def shutdown(self) -> None:
        """Stop every idle worker. A read still running returns its workers when it ends; every worker also exits by
        itself when this process does, as its socket closes."""
        if os.getpid() != self.owner_pid:
            return
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.stop()


_POOL: WorkerPool | None = None
_POOL_LOCK = threading.Lock()


def default_pool() -> WorkerPool:
    """The process-wide pool, created on first use."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.owner_pid != os.getpid():
            _POOL = WorkerPool()
            atexit.register(_POOL.shutdown)
        return _POOL


def _describe(task: dict) -> str:
    return f"frames {task['first_index']}-{task['last_index']}"


def run_tasks(
    pool: WorkerPool, tasks: list[dict], workers: int, timeout_s: float, path: str, stats: dict
) -> Iterator[np.ndarray]:
    """Run ``tasks`` on up to ``workers`` pooled processes, in order, each on the next free worker.

    Yields arrays of buffer slots as the workers report them written. Raises DecodeWorkerError when a worker
    reports an error, dies, or sends nothing for ``timeout_s`` seconds. However it ends (done, error, the
    consumer closing the generator, KeyboardInterrupt), running tasks are cancelled and the workers go back to
    the pool or, if unresponsive, are killed.
    """
    pending = deque(tasks)
    running: dict[Connection, WorkerProcess] = {}
    failed: list[WorkerProcess] = []
    try:
        checked_out = pool.acquire(min(workers, len(tasks)))
    except WorkerStartError as e:
        raise DecodeWorkerError(path, f"cannot start decoder workers: {e}") from e
    idle = list(checked_out)

    def assign(worker: WorkerProcess, replaced: bool = False) -> None:
        task = pending.popleft()
        worker.task, worker.last_heard = task, time.monotonic()
        try:
            worker.send(("decode", task))
        except OSError:
            failed.append(worker)
            if replaced:
                raise DecodeWorkerError(
                    path, f"decoder worker pid {worker.pid} {worker.exit_reason()} before decoding {_describe(task)}"
                ) from None
            # It died between tasks (killed while idle, the OOM killer) and holds no work of ours: one fresh
            # process takes its place, and a second death fails the read.
            pending.appendleft(task)
            try:
                fresh = pool.replace(worker)
            except WorkerStartError as e:
                raise DecodeWorkerError(path, f"cannot replace a dead decoder worker: {e}") from e
            checked_out.append(fresh)
            assign(fresh, replaced=True)
            return
        running[worker.conn] = worker

    try:
        while pending and idle:
            assign(idle.pop())
        while running:
            now = time.monotonic()
            deadline = min(w.last_heard for w in running.values()) + timeout_s
            for conn in wait(list(running), timeout=min(POLL_S, max(0.0, deadline - now))):
                worker = running[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    failed.append(worker)
                    del running[conn]
                    raise DecodeWorkerError(
                        path,
                        f"decoder worker pid {worker.pid} {worker.exit_reason()} while decoding "
                        f"{_describe(worker.task)}",
                    ) from None
                worker.last_heard = time.monotonic()
                kind, task_id = message[0], message[1]
                if task_id != worker.task["id"]:
                    continue  # a late message about a task cancelled earlier
                if kind == "progress":
                    if message[2].size:
                        yield message[2]
                elif kind == "done":
                    for key, value in message[3].items():
                        stats[key] = stats.get(key, 0) + value
                    del running[conn]
                    if pending:
                        assign(worker)
                    if message[2].size:
                        yield message[2]
                elif kind == "error":
                    del running[conn]
                    raise DecodeWorkerError(path, f"decoding {_describe(worker.task)} failed: {message[2]}")
            now = time.monotonic()
            for conn, worker in list(running.items()):
                # Messages may be waiting unread while our consumer was busy: only silence counts.
                if now - worker.last_heard > timeout_s and not conn.poll():
                    del running[conn]
                    failed.append(worker)
                    raise DecodeWorkerError(
                        path,
                        f"decoder worker pid {worker.pid} sent nothing for {timeout_s:g} s while decoding "
                        f"{_describe(worker.task)}; it was stopped",
                    )
    finally:
        # A worker silent for timeout_s is hung, so waiting longer than that for its acknowledgement is pointless.
        _cancel(running, failed, min(CANCEL_TIMEOUT_S, timeout_s))
        for worker in checked_out:
            if worker in failed:
                pool.discard(worker)
            else:
                pool.release(worker)


def _cancel(running: dict[Connection, WorkerProcess], failed: list[WorkerProcess], timeout_s: float) -> None:
    """Cancel the tasks still running and wait until each worker acknowledges; the caller kills those that do
    not answer within ``timeout_s`` (they are added to ``failed``)."""
    for conn, worker in list(running.items()):
        try:
            worker.send(("cancel", worker.task["id"]))
        except OSError:
            failed.append(worker)
            del running[conn]
    deadline = time.monotonic() + timeout_s
    while running:
        ready = wait(list(running), timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            failed.extend(running.values())
            return
        for conn in ready:
            worker = running[conn]
            try:
                message = conn.recv()
            except (EOFError, OSError):
                failed.append(worker)
                del running[conn]
                continue
            if message[0] in ("done", "error", "cancelled") and message[1] == worker.task["id"]:
                del running[conn]
