"""The ``upcyclebase`` command: one subcommand per job.

Each subcommand lives in its own module with ``register(subparsers)``; the module's
``run(args)`` does the work. Errors that come from user input are printed as one line
and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib import import_module

from .args import UsageError

COMMANDS = ("prepare", "upcycle", "prepare_mmlu", "prepare_data", "train", "eval", "bench")
USAGE_ERRORS = (UsageError, ValueError, FileNotFoundError, FileExistsError, OSError)


def add_command(subparsers, name: str, help: str, run) -> argparse.ArgumentParser:
    """Add a subcommand that accepts ``--debug`` and calls ``run(args)``."""
    parser = subparsers.add_parser(name, help=help, description=help)
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks and debug logs.")
    parser.set_defaults(run=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="upcyclebase", description="Upcycle Gemma-3 models with routed extra attention heads.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        import_module(f".{name}", __name__).register(subparsers)
    return parser


def configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_command(args: argparse.Namespace) -> int:
    configure_logging(args.debug)
    try:
        return args.run(args) or 0
    except USAGE_ERRORS as error:
        if args.debug:
            raise
        print(f"upcyclebase {args.command}: error: {error}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args)


def script_main(command: str) -> int:
    """Entry point of the root scripts: ``python upcycle_heads.py ...`` is ``upcyclebase upcycle ...``."""
    return main([command, *sys.argv[1:]])
