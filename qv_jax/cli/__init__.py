"""The ``qv-jax`` command line: one subcommand per module in this package.

Each subcommand module defines ``add_parser(subparsers)``, which registers its parser and sets ``func`` to the
callable that runs it with the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qv_jax.errors import QVError

# Subcommand modules, in the order ``qv-jax --help`` lists them.
COMMANDS: tuple[str, ...] = ("demo", "ask", "encode", "decode", "convert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qv-jax", description="Answer questions about long videos with Qwen2.5-VL in JAX."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"qv_jax.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QVError as e:
        print(f"qv-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qv-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
