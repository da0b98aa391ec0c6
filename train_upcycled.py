"""Train the extra heads and routers of an upcycled Gemma-3; same flags as ``upcyclebase train``."""

import sys

from upcyclebase.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("train"))
