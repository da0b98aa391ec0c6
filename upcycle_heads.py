"""Upcycle a Gemma-3 model with routed extra heads; same flags as ``upcyclebase upcycle``."""

import sys

from upcyclebase.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("upcycle"))
