#!/usr/bin/env python
"""Predict masks, depth maps or both (segmentation + depth models): see ``python scripts/predict.py --help``."""

import sys

from dptune.command import launch

if __name__ == "__main__":
    sys.exit(launch("dptune.tools.predict"))
