"""The cores this process may use, read where the package's lowest layer can import it (ONNX Runtime's
sessions and the training defaults both size their threads by it)."""

from __future__ import annotations

import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")  # where the CPU quota is read (cgroup v2 ``cpu.max``, v1 ``cpu/cpu.cfs_*``)


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (containers,
    SLURM) where one is set. Everything dptune sizes by the machine's cores asks this (threads,
    loader workers, ONNX Runtime sessions, the benchmarks' peak and their records)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for path, split in ((CGROUP / "cpu.max", None), (CGROUP / "cpu" / "cpu.cfs_quota_us", "v1")):
        try:
            if split is None:
                quota, period = path.read_text().split()[:2]
            else:
                quota, period = path.read_text().strip(), (CGROUP / "cpu" / "cpu.cfs_period_us").read_text().strip()
            if quota not in ("max", "-1") and int(period) > 0:
                cores = min(cores, max(1, -(-int(quota) // int(period))))
        except (OSError, ValueError):  # absent, or not the kernel's numbers: no quota known from this file
            continue
        break
    return max(1, cores)
