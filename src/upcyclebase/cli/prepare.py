"""``upcyclebase prepare``: convert the embedded Gemma-3 270M into a Hugging Face folder once."""

from __future__ import annotations

import argparse

from ..embedded import embedded_model_dir, prepare_embedded_model


def run(args: argparse.Namespace) -> int:
    folder = prepare_embedded_model(args.folder)
    print(f"Gemma-3 270M ready at {folder}")
    return 0


def register(subparsers) -> None:
    from . import add_command

    parser = add_command(subparsers, "prepare", "Prepare the embedded Gemma-3 270M (converted once, then reused).", run)
    parser.add_argument("--folder", default=None, help=f"Target folder (default: {embedded_model_dir()}).")
