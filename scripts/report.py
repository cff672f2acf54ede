"""Thin wrapper: ``python -m scripts.report <multirun dir> [--out DIR]`` = ``prunedlora-report``."""

import sys

from prunedlora.eval.report import main

if __name__ == "__main__":
    sys.exit(main())
