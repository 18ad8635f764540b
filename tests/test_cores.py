"""The cores a process may use, as a container or a SLURM job grants them: the CPU affinity capped by
the cgroup CPU quota. Everything dptune sizes by the machine reads it from one place."""

from __future__ import annotations

import os

import pytest

from dptune import cores


@pytest.fixture
def container(tmp_path, monkeypatch):
    """A 16-core machine's affinity, and ``tmp_path`` standing in for the cgroup folder."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(cores, "CGROUP", tmp_path)
    monkeypatch.setattr(cores, "PROC_CGROUP", tmp_path / "no-proc-self-cgroup", raising=False)
    monkeypatch.setattr(cores, "PROC_MOUNTINFO", tmp_path / "no-proc-self-mountinfo", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return tmp_path


@pytest.mark.parametrize("files,expected", [
    ({"cpu.max": "200000 100000\n"}, 2),  # cgroup v2: 2 CPUs
    ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: a second thread still has half a core
    ({"cpu.max": "max 100000\n"}, 16),  # no quota
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 16),
    ({"cpu.max": "4000000 100000\n"}, 16),  # a quota above the affinity: the affinity
    ({}, 16),  # no cgroup files (not Linux, or not mounted)
    ({"cpu.max": "2e5 100000\n"}, 16),  # unreadable numbers: no quota known (was a traceback at import time)
    ({"cpu.max": "max\n"}, 16),
    ({"cpu/cpu.cfs_quota_us": "lots\n", "cpu/cpu.cfs_period_us": "100000\n"}, 16),
    # numbers the kernel never writes: no quota, not a job starved to one core
    ({"cpu.max": "0 100000\n"}, 16),
    ({"cpu.max": "-5 100000\n"}, 16),
    ({"cpu/cpu.cfs_quota_us": "-5\n", "cpu/cpu.cfs_period_us": "100000\n"}, 16),
])
def test_usable_cores_is_the_affinity_capped_by_the_quota(container, files, expected):
    for name, text in files.items():
        (container / name).parent.mkdir(parents=True, exist_ok=True)
        (container / name).write_text(text)
    assert cores.usable_cores() == expected


@pytest.mark.parametrize("own,files,expected", [
    # cgroup v2 without a namespace (a systemd slice, a batch job): the quota sits on the process's
    # own cgroup or a parent of it, not on the root
    ("0::/jobs.slice/job42.scope\n", {"jobs.slice/job42.scope/cpu.max": "200000 100000\n"}, 2),
    ("0::/jobs.slice/job42.scope\n", {"jobs.slice/cpu.max": "300000 100000\n",
                                       "jobs.slice/job42.scope/cpu.max": "max 100000\n"}, 3),
    # the tightest on the way up wins, wherever it is
    ("0::/a/b\n", {"cpu.max": "800000 100000\n", "a/cpu.max": "100000 100000\n", "a/b/cpu.max": "400000 100000\n"}, 1),
    # cgroup v1: the cpu controller's line names the path (here a hybrid layout, as many hosts have)
    ("1:cpu,cpuacct:/user/job7\n0::/\n", {"cpu/user/job7/cpu.cfs_quota_us": "400000\n",
                                             "cpu/user/job7/cpu.cfs_period_us": "100000\n"}, 4),
    # a container that mounts its own cgroup at the root: the path it names is not there; the root's quota
    ("0::/docker/0123abcd\n", {"cpu.max": "200000 100000\n"}, 2),
    # malformed lines and unreadable numbers on the way: skipped, the rest still read
    ("garbage\n0::/x\n", {"x/cpu.max": "lots 100000\n", "cpu.max": "500000 100000\n"}, 5),
    # a path the kernel would not write: no traceback
    ("0:://x\n", {"x/cpu.max": "300000 100000\n"}, 3),
])
def test_the_quota_of_the_process_own_cgroup_counts(container, monkeypatch, own, files, expected):
    """Before, only the cgroup root's files were read: a job given 2 CPUs in its own cgroup of a
    16-core host sized threads and loader workers for 16."""
    (container / "self-cgroup").write_text(own)
    monkeypatch.setattr(cores, "PROC_CGROUP", container / "self-cgroup")
    for name, text in files.items():
        (container / name).parent.mkdir(parents=True, exist_ok=True)
        (container / name).write_text(text)
    assert cores.usable_cores() == expected


def _mountinfo(*mounts: tuple[str, str, str, str]) -> str:
    """/proc/self/mountinfo lines: (hierarchy's folder mounted, mount point, fstype, super options)."""
    return "".join(f"{30 + i} 23 0:{40 + i} {root} {point} rw,relatime - {fstype} {fstype} {opts}\n"
                   for i, (root, point, fstype, opts) in enumerate(mounts))


def _layout(monkeypatch, base, own: bytes, mounts: str, files: dict[str, str]) -> None:
    (base / "self-cgroup").write_bytes(own)
    (base / "self-mountinfo").write_text(mounts)
    monkeypatch.setattr(cores, "PROC_CGROUP", base / "self-cgroup")
    monkeypatch.setattr(cores, "PROC_MOUNTINFO", base / "self-mountinfo")
    for name, text in files.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(text)


def test_a_container_mounting_its_own_cgroup_reads_it_from_the_mount_root(container, monkeypatch):
    """Docker without a cgroup namespace: /proc/self/cgroup names the host's path, the mount shows the
    container's own cgroup at /sys/fs/cgroup (mountinfo says which). A folder inside the container
    named like one of the host's parents is not that parent: before, systemd's own system.slice
    inside the container (1 CPU) was read as the host's and the job got 1 core of its 8."""
    m = str(container)
    _layout(monkeypatch, container,
            b"0::/system.slice/docker-ab12.scope/user.slice/job\n",
            _mountinfo(("/system.slice/docker-ab12.scope", m, "cgroup2", "rw")),
            {"cpu.max": "800000 100000\n", "system.slice/cpu.max": "100000 100000\n",
             "user.slice/job/cpu.max": "max 100000\n"})
    assert cores.usable_cores() == 8


def test_v1_read_where_the_mount_table_puts_the_cpu_controller(container, monkeypatch):
    """cpu co-mounted with cpuacct in a folder of that name and no ``cpu`` link: before, missed (16)."""
    point = container / "cpu,cpuacct"
    _layout(monkeypatch, container, b"4:cpu,cpuacct:/slurm/job9\n3:memory:/slurm/job9\n",
            _mountinfo(("/", str(point), "cgroup", "rw,cpu,cpuacct"), ("/", str(container / "memory"), "cgroup", "rw,memory")),
            {"cpu,cpuacct/slurm/job9/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/slurm/job9/cpu.cfs_period_us": "100000\n",
             "memory/slurm/job9/cpu.cfs_quota_us": "100000\n", "memory/slurm/job9/cpu.cfs_period_us": "100000\n"})
    assert cores.usable_cores() == 2


def test_a_mount_point_with_a_space_and_a_cgroup_name_in_latin1(container, monkeypatch):
    """mountinfo writes a space as \\040; the kernel writes cgroup names as raw bytes (before: a
    UnicodeDecodeError out of every default sized by the cores)."""
    point = container / "cg root"
    _layout(monkeypatch, container, b"0::/caf\xe9\n",
            _mountinfo(("/", str(point).replace(" ", "\\040"), "cgroup2", "rw")), {"cg root/cpu.max": "max 100000\n"})
    (point / os.fsdecode(b"caf\xe9")).mkdir()
    (point / os.fsdecode(b"caf\xe9") / "cpu.max").write_text("300000 100000\n")
    assert cores.usable_cores() == 3


def test_a_process_outside_its_cgroup_namespace_root_is_not_given_its_quota(container, monkeypatch):
    """/proc/self/cgroup says ``/../../user.slice/x`` (nsenter into a container's namespaces): the
    quota at the mount is another cgroup's, and a folder named like the rest of the path is not
    this process's cgroup."""
    _layout(monkeypatch, container, b"0::/../../user.slice/x\n", _mountinfo(("/", str(container), "cgroup2", "rw")),
            {"cpu.max": "200000 100000\n", "user.slice/x/cpu.max": "100000 100000\n"})
    assert cores.usable_cores() == 16


def test_a_mount_covered_by_a_later_one_is_not_read(container, monkeypatch):
    """systemd in Docker on cgroup v1 (``-v /sys/fs/cgroup:/sys/fs/cgroup``): Docker's own cpu mount
    (the container's cgroup, 8 CPUs) is covered by the host's hierarchy bound over it. The covered
    entry is still in mountinfo; read as if it were shown, the host's user.slice (1 CPU) passed for
    the job's parent. The host's view holds the container's cgroup under /docker/ab12."""
    m = container
    lines = [("/", m, "tmpfs", "rw"), ("/docker/ab12", m / "cpu", "cgroup", "rw,cpu,cpuacct"),
             ("/", m, "tmpfs", "rw"), ("/", m / "cpu", "cgroup", "rw,cpu,cpuacct")]
    ids = ["31 23", "32 31", "50 31", "51 50"]  # the host's tmpfs sits on Docker's, its cpu mount on it
    table = "".join(f"{ids[i]} 0:{40 + i} {root} {point} rw - {fstype} {fstype} {opts}\n"
                    for i, (root, point, fstype, opts) in enumerate(lines))
    files = {"cpu/user.slice/cpu.cfs_quota_us": "100000\n", "cpu/user.slice/cpu.cfs_period_us": "100000\n",
             "cpu/docker/ab12/cpu.cfs_quota_us": "800000\n", "cpu/docker/ab12/cpu.cfs_period_us": "100000\n"}
    _layout(monkeypatch, container, b"4:cpu,cpuacct:/docker/ab12/user.slice/job\n", table, files)
    assert cores.usable_cores() == 8


def test_cgroup_names_are_split_at_newlines_only(container, monkeypatch):
    """/proc/self/cgroup writes names raw: one holding \\x1e (or \\r) is one name, not a line break
    that left the sibling ``job``'s quota to be read."""
    _layout(monkeypatch, container, b"0::/job\x1e1\n", _mountinfo(("/", str(container), "cgroup2", "rw")),
            {"job/cpu.max": "100000 100000\n", "job\x1e1/cpu.max": "400000 100000\n"})
    assert cores.usable_cores() == 4


def test_a_mounted_sub_cgroup_is_read_when_the_own_cgroup_is_unknown(container, monkeypatch):
    _layout(monkeypatch, container, b"", _mountinfo(("/kubepods/pod1/c1", str(container), "cgroup2", "rw")),
            {"cpu.max": "200000 100000\n"})
    assert cores.usable_cores() == 2


def test_every_default_sized_by_the_cores_follows_the_quota(container):
    """2 CPUs of a 16-core machine: no loader worker (on 16 cores: 8), ONNX Runtime and the inference
    benchmark on 2 threads, 2 cores in what the benchmarks record and in the training step's peak
    FLOP/s. Before, all but the training threads and ONNX Runtime's sessions read the affinity (16)."""
    from dptune.data.loaders import default_workers
    from dptune.inference.onnx_runner import cpu_info, session_options
    from dptune.tools.benchmark import peak_tflops
    from dptune.tools.infer_bench import default_threads
    from dptune.training.hardware import usable_cores

    (container / "cpu.max").write_text("200000 100000\n")
    assert usable_cores() == 2
    assert default_workers(None) == 0 and default_workers(3) == 3
    assert default_threads() == 2
    assert cpu_info()["cores_usable"] == 2
    assert session_options().intra_op_num_threads == 2
    assert peak_tflops("cpu", "32-true")[1].startswith("2 cores x ")
    (container / "cpu.max").write_text("max 100000\n")
    assert default_workers(None) == 8 and default_threads() == 16
