#!/usr/bin/env python
"""Training images/s, peak memory and MFU, optionally against a plain HF Trainer: see --help."""

import sys

from dptune.tools.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
