#!/usr/bin/env python
"""Fine-tune a DPT for semantic segmentation: ``python train.py fit --config configs/quickstart.yaml``.

Subcommands: fit, validate, test. ``python train.py fit --help`` lists every setting.
"""

import sys

from dptune.command import launch

if __name__ == "__main__":
    sys.exit(launch("dptune.cli", entry=False))  # main closes its W&B run; a Ctrl-C at exit stays Python's
