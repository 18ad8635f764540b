"""The cores this process may use, and whether its CPU runs bf16 natively, read where the package's lowest
layer can import them (ONNX Runtime's sessions and the training defaults size their threads by the cores;
the precision ``auto`` picks and the models' resize kernel follow the bf16 support)."""

from __future__ import annotations

import os
import re
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")  # where the quota is read when the mount table is unknown (v2 ``cpu.max``, v1 ``cpu/``)
PROC_CGROUP = Path("/proc/self/cgroup")  # which cgroup this process is in, per hierarchy
PROC_MOUNTINFO = Path("/proc/self/mountinfo")  # where each cgroup hierarchy is mounted, and which part of it


def _read(path: Path) -> str:
    """A kernel file's text; names in it are raw bytes, decoded as the file system's names are."""
    return os.fsdecode(path.read_bytes())


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per hierarchy: ``"v2"`` and ``"v1"`` (v1's ``cpu`` controller)."""
    own: dict[str, str] = {}
    try:
        lines = _read(PROC_CGROUP).split("\n")  # not splitlines(): a cgroup name may hold \r or \x1c raw
    except OSError:
        return own
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, path = parts
        path = path.removesuffix(" (deleted)")
        if hier == "0" and controllers == "":
            own["v2"] = path
        elif "cpu" in controllers.split(","):
            own["v1"] = path
    return own


def _unescape(field: str) -> str:
    """mountinfo writes a space, tab, newline or backslash in a path as octal (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts() -> list[tuple[str, Path, str]]:
    """(hierarchy, mount point, the hierarchy's folder mounted there) of each cgroup2 mount and each
    v1 mount holding the ``cpu`` controller that a path reaches (not covered by a later mount, e.g.
    a container run with ``-v /sys/fs/cgroup:/sys/fs/cgroup``); without a readable mount table, the
    usual places."""
    try:
        lines = _read(PROC_MOUNTINFO).split("\n")
    except OSError:
        return [("v2", CGROUP, "/"), ("v1", CGROUP / "cpu", "/"), ("v1", CGROUP / "cpu,cpuacct", "/")]
    table = []  # (mount id, parent id, mount point, cgroup entry or None), in the kernel's order
    for line in lines:
        fields = line.split(" ")
        if "-" not in fields or fields.index("-") < 6 or len(fields) < fields.index("-") + 4:
            continue
        sep = fields.index("-")
        fstype, super_opts, point = fields[sep + 1], fields[sep + 3].split(","), _unescape(fields[4])
        entry = None
        if fstype == "cgroup2" or (fstype == "cgroup" and "cpu" in super_opts):
            entry = ("v2" if fstype == "cgroup2" else "v1", Path(point), _unescape(fields[3]))
        table.append((fields[0], fields[1], _parts(point) or [], entry))
    parent_of = {mid: parent for mid, parent, _, _ in table}
    mounts = []
    for i, (mid, _, point, entry) in enumerate(table):
        if entry is None:
            continue
        chain, up = set(), parent_of.get(mid)
        while up is not None and up not in chain:  # the mounts this one sits on
            chain.add(up)
            up = parent_of.get(up)
        # a later mount at this point or above it, not one this mount sits on, hides it
        if not any(later != mid and later not in chain and point[:len(at)] == at for later, _, at, _ in table[i + 1:]):
            mounts.append(entry)
    return mounts


def _parts(path: str) -> list[str] | None:
    """A cgroup path's folders, or None where it is not a plain path below the root (``..``: a
    process outside its cgroup namespace's root)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return None if ".." in parts else parts


def _folders(own: str | None, mount: Path, root: str) -> list[Path]:
    """The folders, under ``mount``, of the process's cgroup ``own`` and each parent of it up to what
    is mounted there (``root``, the hierarchy's folder shown at ``mount``): a quota on any of them
    limits the process. A cgroup outside what is mounted shows none of them; where the process's
    cgroup is unknown, the mount's own folder is read."""
    if own is None:
        return [mount]
    own_parts, root_parts = _parts(own), _parts(root)
    if own_parts is None or root_parts is None or own_parts[:len(root_parts)] != root_parts:
        return []
    rel = own_parts[len(root_parts):]
    return [mount.joinpath(*rel[:i]) for i in range(len(rel), -1, -1)]


def _quota(folder: Path, v1: bool) -> int | None:
    """The CPUs one cgroup folder's quota grants (rounded up), or None: no quota, no file, or not the
    kernel's numbers."""
    try:
        if v1:
            quota = _read(folder / "cpu.cfs_quota_us").strip()
            period = _read(folder / "cpu.cfs_period_us").strip()
        else:
            quota, period = _read(folder / "cpu.max").split()[:2]
        if quota == "max" or int(quota) <= 0 or int(period) <= 0:  # -1 (v1) and max (v2): no quota
            return None
        return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by the tightest cgroup CPU quota on
    the way from this process's own cgroup (``/proc/self/cgroup``) up to what is mounted of its
    hierarchy (``/proc/self/mountinfo``): containers, systemd slices, SLURM. Everything dptune sizes
    by the machine's cores asks this (threads, loader workers, ONNX Runtime sessions, the
    benchmarks' peak and their records)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    own = _own_paths()
    for hierarchy, mount, root in _mounts():
        for folder in _folders(own.get(hierarchy), mount, root):
            granted = _quota(folder, hierarchy == "v1")
            if granted is not None:
                cores = min(cores, granted)
    return max(1, cores)


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_native_bf16() -> tuple[bool, str]:
    """Whether this CPU runs bf16 matrix products natively, and the evidence, in words."""
    import torch  # here, not at the top: ONNX Runtime's sessions read the cores without torch

    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    flags = cpu_flags()
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    capability = torch.backends.cpu.get_cpu_capability()
    if flags and not native:
        return False, f"CPU without native bf16 (torch dispatches {capability}; no avx512_bf16/amx_bf16 flag)"
    if not onednn:
        return False, f"CPU without bf16 support in oneDNN (torch dispatches {capability})"
    if capability not in ("AVX512", "AMX"):
        return False, f"CPU restricted to {capability} kernels (ATEN_CPU_CAPABILITY)"
    evidence = "/".join(native) if native else "oneDNN bf16"
    return True, f"CPU with native bf16 ({evidence}, torch dispatches {capability})"
