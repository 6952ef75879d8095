"""Multi-process tests (``jax.distributed`` over local processes): a free port, and ranks run at once."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    argv: Callable[[int], list[str]], processes: int, logs: Path, *, env: dict, cwd: Path | None = None
) -> None:
    """Run ``argv(rank)`` for every rank at once (``RANK`` set in its environment), each logging to
    ``logs/rank<N>.log``; raise an AssertionError with the log tails of the ranks that did not exit 0."""
    paths = [logs / f"rank{rank}.log" for rank in range(processes)]
    procs = []
    for rank, path in enumerate(paths):
        with open(path, "w") as out:  # files, not pipes: a full pipe could stall one process inside a collective
            procs.append(subprocess.Popen(argv(rank), cwd=cwd, env={**env, "RANK": str(rank)}, stdout=out, stderr=out))
    try:
        codes = [proc.wait(timeout=600) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    failed = [
        f"rank {rank} exited {code}:\n{paths[rank].read_text()[-4000:]}" for rank, code in enumerate(codes) if code
    ]
    if failed:
        raise AssertionError("\n".join(failed))
