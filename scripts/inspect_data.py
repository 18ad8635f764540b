#!/usr/bin/env python
"""Dataset report of a config of any task (classes, depth range) and class weights:
``python scripts/inspect_data.py configs/camvid.yaml``, ``configs/depth/7scenes.yaml``, ``configs/multitask/...``."""

import sys

from dptune.command import launch

if __name__ == "__main__":
    sys.exit(launch("dptune.tools.inspect"))
