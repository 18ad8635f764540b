#!/usr/bin/env python
"""Export a checkpoint for plain transformers: ``python scripts/export.py RUN/checkpoints/last.ckpt OUT``."""

import sys

from dptune.export import main

if __name__ == "__main__":
    sys.exit(main())
