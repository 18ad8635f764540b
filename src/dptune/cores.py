"""The cores this process may use, read where the package's lowest layer can import it (ONNX Runtime's
sessions and the training defaults both size their threads by it)."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (containers,
    SLURM) where one is set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for path, split in (("/sys/fs/cgroup/cpu.max", None), ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "v1")):
        try:
            if split is None:
                quota, period = open(path).read().split()[:2]
            else:
                quota, period = open(path).read().strip(), open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read().strip()
        except (OSError, ValueError):
            continue
        if quota not in ("max", "-1") and int(period) > 0:
            cores = min(cores, max(1, -(-int(quota) // int(period))))
        break
    return max(1, cores)
