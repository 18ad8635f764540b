#!/usr/bin/env python
"""Export a checkpoint for plain transformers: ``python scripts/export.py RUN/checkpoints/last.ckpt OUT``."""

import sys

from dptune.command import launch

if __name__ == "__main__":
    sys.exit(launch("dptune.export.cli"))
