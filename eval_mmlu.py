"""Evaluate the stock and upcycled model on MMLU and perplexity; same flags as ``upcyclebase eval``."""

import sys

from upcyclebase.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("eval"))
