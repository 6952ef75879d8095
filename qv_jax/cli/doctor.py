"""``qv-jax doctor``: list the shared memory qv-jax runs left behind, and with ``--clean`` remove what is safe to.

A run killed outright (SIGKILL, the OOM killer) leaves its frame buffer in /dev/shm or the temporary directory.
The decoder pool removes such buffers itself when it next starts; this command shows them, and what still holds
memory, without starting one.
"""

from __future__ import annotations

import argparse

from qv_jax.cli.report import plural

STATES = {"dead": "owner gone", "live": "in use", "unknown": "kept"}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="list (and with --clean remove) frame buffers left by killed qv-jax runs",
        description="List qv-jax frame buffers in /dev/shm and the temporary directory with their sizes and "
        "owners. With --clean, remove those whose owner process is provably gone; buffers of running processes, "
        "and those whose owner cannot be told (another pid namespace or user), are never removed.",
    )
    parser.add_argument("--clean", action="store_true", help="remove the buffers of dead owners")
    parser.set_defaults(func=run)


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


def run(args: argparse.Namespace) -> int:
    from qv_jax.video.buffer import buffer_dirs, leftovers, remove_stale

    found = leftovers()
    removed = {leftover.path for leftover in remove_stale(found)} if args.clean else set()
    for leftover in found:
        state = "removed" if leftover.path in removed else STATES[leftover.state]
        print(f"{leftover.path}  {_mib(leftover.nbytes)}  {state}: {leftover.reason}")
    dead = [leftover for leftover in found if leftover.state == "dead"]
    where = " and ".join(buffer_dirs())
    if not found:
        print(f"no qv-jax frame buffers in {where}")
    elif args.clean:
        freed = sum(leftover.nbytes for leftover in dead if leftover.path in removed)
        print(f"removed {plural(len(removed), 'frame buffer')} of dead processes ({_mib(freed)})")
    elif dead:
        total = sum(leftover.nbytes for leftover in dead)
        dead_buffers = plural(len(dead), "frame buffer")
        print(f"{dead_buffers} of dead processes ({_mib(total)}): `qv-jax doctor --clean` removes them")
    else:
        print("nothing to remove")
    return 0
