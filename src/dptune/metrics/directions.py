"""Which end of each value dptune logs is best: what a checkpoint or early stopping that monitors it
must keep (``mode``)."""

from __future__ import annotations

from dptune.metrics.depth import LOWER_IS_BETTER

# names of logged values whose best is the highest (any "loss" and the depth errors are best lowest)
HIGHER_IS_BETTER = {"mIoU", "pixel_acc", "mAcc", "delta1", "delta2", "delta3", "delta_m"}


def monitor_mode(monitor: str) -> str | None:
    """``min`` or ``max``: which end of a value validation (or training) logs is best, by its name
    (``val/IoU/<class>`` a class's IoU, ``val/<source>/abs_rel`` a source's); None for a name dptune does not
    know (``epoch``, ``step``, a callback's own)."""
    parts = monitor.split("/")
    name = parts[-1]
    if len(parts) == 3 and parts[1] == "IoU":
        return "max"
    if name.startswith("loss") or name in LOWER_IS_BETTER:
        return "min"
    return "max" if name in HIGHER_IS_BETTER else None
