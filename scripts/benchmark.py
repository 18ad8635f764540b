#!/usr/bin/env python
"""Training images/s, peak memory and MFU, optionally against a plain HF Trainer: see --help."""

import sys

from dptune.command import launch

if __name__ == "__main__":
    sys.exit(launch("dptune.tools.benchmark"))
