"""The cores this process may use, read where the package's lowest layer can import it (ONNX Runtime's
sessions and the training defaults both size their threads by it)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

CGROUP = Path("/sys/fs/cgroup")  # where the CPU quota is read (cgroup v2 ``cpu.max``, v1 ``cpu/cpu.cfs_*``)
PROC_CGROUP = Path("/proc/self/cgroup")  # which cgroup this process is in, per hierarchy


def _own_paths() -> tuple[str, str]:
    """This process's cgroup path in the v2 hierarchy and in v1's ``cpu`` one ("/" where unknown)."""
    v2 = v1 = "/"
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, path = parts
        if hier == "0" and controllers == "":
            v2 = path or "/"
        elif "cpu" in controllers.split(","):
            v1 = path or "/"
    return v2, v1


def _folders(base: Path, path: str) -> list[Path]:
    """``base`` joined with ``path`` and each of its parents up to ``base`` itself: a quota set on any
    of them limits this process. A path the mount does not show (a container that mounts its own
    cgroup at the root) leaves only folders that do not exist, and ``base``."""
    rel = PurePosixPath(path if path.startswith("/") else "/" + path).relative_to("/")
    parts = [p for p in rel.parts if p not in ("", ".", "..")]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _quota(folder: Path, v1: bool) -> int | None:
    """The CPUs one cgroup folder's quota grants (rounded up), or None: no quota, no file, or not the
    kernel's numbers."""
    try:
        if v1:
            quota = (folder / "cpu.cfs_quota_us").read_text().strip()
            period = (folder / "cpu.cfs_period_us").read_text().strip()
        else:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        if quota in ("max", "-1") or int(period) <= 0:
            return None
        return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by the tightest cgroup CPU quota on
    the way from this process's own cgroup (``/proc/self/cgroup``) up to the root (containers,
    systemd slices, SLURM). Everything dptune sizes by the machine's cores asks this (threads,
    loader workers, ONNX Runtime sessions, the benchmarks' peak and their records)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    v2_path, v1_path = _own_paths()
    candidates = [(f, False) for f in _folders(CGROUP, v2_path)]
    candidates += [(f, True) for f in _folders(CGROUP / "cpu", v1_path)]
    for folder, v1 in candidates:
        granted = _quota(folder, v1)
        if granted is not None:
            cores = min(cores, granted)
    return max(1, cores)
