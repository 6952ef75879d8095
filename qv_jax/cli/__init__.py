"""The ``qv-jax`` command line: one subcommand per module in this package.

Each subcommand module defines ``add_parser(subparsers)``, which registers its parser and sets ``func`` to the
callable that runs it with the parsed arguments and returns an exit code. Exit codes: 0 done, 2 bad input (one
message line), 130 interrupted (Ctrl-C, SIGTERM, SIGHUP: the same clean-up runs), 1 a bug (one line; the
traceback with ``--debug``). See docs/guide.md (Command line).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import traceback

from qv_jax.errors import QVError

# Subcommands, in the order ``qv-jax --help`` lists them; each is the module of its name with ``_`` for ``-``.
COMMANDS: tuple[str, ...] = (
    "demo",
    "ask",
    "encode",
    "watch",
    "decode",
    "convert",
    "identify-heads",
    "finetune",
    "info",
    "doctor",
)
# Signals that end a run the way Ctrl-C does: unwinding, so shared memory, workers and partial outputs go.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)


def _stop(signum, _frame) -> None:
    raise Stopped(signum)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qv-jax", description="Answer questions about long videos with Qwen2.5-VL in JAX."
    )
    from qv_jax import __version__

    parser.add_argument("--version", action="version", version=f"qv-jax {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"qv_jax.cli.{name.replace('-', '_')}").add_parser(subparsers)
    for sub in subparsers.choices.values():
        # Also accepted after the subcommand; SUPPRESS keeps the top-level value when it is not given there.
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Python runs handlers in the main thread only; an embedding caller on another thread keeps its own.
    in_main = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, _stop) for signum in STOP_SIGNALS} if in_main else {}
    try:
        return int(args.func(args) or 0)
    except QVError as e:
        return _fail(args, e, f"error: {e}", 2)
    except KeyboardInterrupt as e:
        return _fail(args, e, f"interrupted{f' ({e})' if isinstance(e, Stopped) else ''}", 130)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return _fail(args, e, f"error: {where}{e.strerror or e}", 2)
    except Exception as e:
        return _fail(args, e, f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", 1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _fail(args: argparse.Namespace, error: BaseException, message: str, code: int) -> int:
    if args.debug:
        traceback.print_exception(error)
    first = message.strip().splitlines()[0] if message.strip() else message
    print(f"qv-jax {args.command}: {first}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
