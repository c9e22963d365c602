"""``python -m minipatch``: see :mod:`minipatch.cli` (the main job and every subcommand)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
