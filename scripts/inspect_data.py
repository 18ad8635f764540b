#!/usr/bin/env python
"""Dataset report and class weights: ``python scripts/inspect_data.py configs/camvid.yaml``."""

import sys

from dptune.tools.inspect import main

if __name__ == "__main__":
    sys.exit(main())
