#!/usr/bin/env python
"""Score a checkpoint or exported directory: see ``python scripts/evaluate.py --help``."""

import sys

from dptune.tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
