#!/usr/bin/env python
"""Predict masks, depth maps or both (segmentation + depth models): see ``python scripts/predict.py --help``."""

import sys

from dptune.tools.predict import main

if __name__ == "__main__":
    sys.exit(main())
