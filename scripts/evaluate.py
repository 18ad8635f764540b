#!/usr/bin/env python
"""Score a checkpoint or exported directory: see ``python scripts/evaluate.py --help``."""

import sys

from dptune.command import launch

if __name__ == "__main__":
    sys.exit(launch("dptune.tools.evaluate"))
