"""A CPU run keeps the memory a step frees for the next step (``dptune.training.memory``): the large
tensors of every step no longer fault in fresh, zeroed pages, and the user's own allocator settings win."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dptune.training import memory

pytestmark = pytest.mark.skipif(memory.glibc() is None, reason="glibc's malloc only")

# a CPU trainer built the way ``dptune fit`` builds it, then a step's worth of large tensors (51 MB each: the
# 7-Scenes depth head's feature maps under 32-true, what an AVX2 CPU runs) made, written and freed 21
# times; page faults counted per step
ALLOCATE = """
import resource, sys, torch
if sys.argv[1] == "trainer":
    from dptune.training.hardware import DPTuneTrainer
    DPTuneTrainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
def step():
    kept = [torch.empty(8, 32, 224, 224).fill_(1.0) for _ in range(3)]
    return sum(float(t[0, 0, 0, 0]) for t in kept)
step()
faults = []
for _ in range(21):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[10])  # the median step: a thread of Lightning's may take a block once
"""

TENSOR_PAGES = 8 * 32 * 224 * 224 * 4 // 4096  # 4 KiB pages of one tensor


def _faults_per_step(how: str, **env: str) -> float:
    clean = {k: v for k, v in os.environ.items()
             if k not in (*memory.USER_SETTINGS, memory.OPT_OUT, "GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", ALLOCATE, how], env=dict(clean, **env), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return float(out.stdout.split()[-1])


def test_a_cpu_trainer_reuses_what_a_step_frees_instead_of_faulting_in_fresh_pages():
    """glibc hands blocks of this size (above its 32 MiB dynamic-threshold cap) back to the kernel when
    freed; the next step faulted in fresh, zeroed pages (the 7-Scenes depth step: 45,000 faults, a fifth
    of its time). With the trainer built, the steady state takes no new pages; glibc's defaults (no
    trainer, or ``DPTUNE_MALLOC=system``) fault in each tensor's pages again on every step."""
    kept = _faults_per_step("trainer")
    plain = _faults_per_step("plain")
    opted_out = _faults_per_step("trainer", DPTUNE_MALLOC="system")
    assert kept < 50, kept
    # without transparent huge pages a 4 KiB fault per page; with them (THP "always") one per 2 MiB
    for faults in (plain, opted_out):
        assert faults > 3 * min(TENSOR_PAGES, TENSOR_PAGES // 512) and faults > 10 * max(kept, 1), (faults, kept)


def test_the_users_own_malloc_settings_win():
    """``MALLOC_MMAP_THRESHOLD_`` given by the user: glibc uses it, and dptune leaves it so."""
    faults = _faults_per_step("trainer", MALLOC_MMAP_THRESHOLD_="131072")
    assert faults > 3 * min(TENSOR_PAGES, TENSOR_PAGES // 512), faults


@pytest.mark.parametrize("env, named", [
    ({"DPTUNE_MALLOC": "system"}, "DPTUNE_MALLOC=system"),
    ({"DPTUNE_MALLOC": " System "}, "DPTUNE_MALLOC=system"),
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_"),
    ({"MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}, "MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, "GLIBC_TUNABLES"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "LD_PRELOAD"),
])
def test_what_leaves_malloc_to_the_user_is_named(env, named):
    assert named in memory.left_to(env)


@pytest.mark.parametrize("env", [{}, {"DPTUNE_MALLOC": ""}, {"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"},
                                 {"LD_PRELOAD": " "}])
def test_nothing_of_the_users_leaves_malloc_to_dptune(env):
    assert memory.left_to(env) is None


def _tool(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in (*memory.USER_SETTINGS, memory.OPT_OUT, "LD_PRELOAD")}
    return subprocess.run([sys.executable, "-m", "dptune.tools.malloc_step", *args], env=dict(clean, **env),
                          capture_output=True, text=True, timeout=600)


def test_the_step_tool_times_both_settings_and_counts_the_faults_it_saves():
    out = _tool("--rounds", "1", "--steps", "5", "--tasks", "depth")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[1]: line.split() for line in out.stdout.splitlines() if line.startswith("depth ")
            and line.split()[1] in ("dptune", "system")}
    assert float(rows["dptune"][4]) < 50 < float(rows["system"][4]), out.stdout  # faults per step
    assert "x the steps per second" in out.stdout


@pytest.mark.parametrize("args, env, said", [
    (["--rounds", "0"], {}, "--rounds 0"),
    (["--steps", "-1"], {}, "--steps -1"),
    (["--tasks", "pose"], {}, "--tasks 'pose'"),
    (["--tasks", " , "], {}, "--tasks"),
    ([], {"DPTUNE_MALLOC": "system"}, "DPTUNE_MALLOC=system"),
])
def test_the_step_tool_refuses_bad_settings_in_one_line(args, env, said):
    out = _tool(*args, **env)
    err = [line for line in out.stderr.splitlines() if "error" in line]
    assert out.returncode == 2 and len(err) == 1 and said in err[0] and "Traceback" not in out.stderr, out.stderr
