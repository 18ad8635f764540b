"""A CPU run keeps the memory a step frees for the next step (``dptune.training.memory``): the large
tensors of every step no longer fault in fresh, zeroed pages, and the user's own allocator settings win."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from dptune.training import memory

pytestmark = pytest.mark.skipif(memory.glibc() is None, reason="glibc's malloc only")

# a CPU trainer built the way ``dptune fit`` builds it, then a step's worth of large tensors (51 MB each: the
# 7-Scenes depth head's feature maps under 32-true, what an AVX2 CPU runs) made, written and freed 21
# times; page faults counted per step
FAULTS = """
def faults(steps):
    def step():
        kept = [torch.empty(8, 32, 224, 224).fill_(1.0) for _ in range(3)]
        return sum(float(t[0, 0, 0, 0]) for t in kept)
    step()
    per = []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        per.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sorted(per)[steps // 2]  # the median step: a thread of Lightning's may take a block once
"""

ALLOCATE = """
import resource, sys, torch
if sys.argv[1] == "trainer":
    from dptune.training.hardware import DPTuneTrainer
    DPTuneTrainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
""" + FAULTS + """
print(faults(21))
"""

TENSOR_PAGES = 8 * 32 * 224 * 224 * 4 // 4096  # 4 KiB pages of one tensor


def _clean() -> dict[str, str]:
    """This environment without the settings that leave malloc to the user."""
    return {k: v for k, v in os.environ.items() if k not in (*memory.USER_SETTINGS, memory.OPT_OUT, "GLIBC_TUNABLES")}


def _faults_per_step(how: str, **env: str) -> float:
    out = subprocess.run([sys.executable, "-c", ALLOCATE, how], env=dict(_clean(), **env), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return float(out.stdout.split()[-1])


def test_a_cpu_trainer_reuses_what_a_step_frees_instead_of_faulting_in_fresh_pages():
    """glibc hands mmapped blocks (this size: above its 32 MiB dynamic-threshold cap) and free memory at the
    heap's top back to the kernel; the next step faulted in fresh, zeroed pages (the 7-Scenes depth step:
    45,000 faults, a fifth of its time). With the trainer built, the steady state takes no new pages; glibc's defaults (no
    trainer, or ``DPTUNE_MALLOC=system``) fault in each tensor's pages again on every step."""
    if _kept_below() < 1024:
        pytest.skip("this glibc keeps freed blocks below 32 MiB only: these 51 MB tensors are mmapped still")
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
    ({"DPTUNE_MALLOC": " System "}, "DPTUNE_MALLOC=System"),
    ({"DPTUNE_MALLOC": "off"}, "DPTUNE_MALLOC=off"),
    ({"DPTUNE_MALLOC": "0"}, "DPTUNE_MALLOC=0"),
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_"),
    ({"MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}, "MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=65536"}, "glibc.malloc.mmap_threshold"),
])
def test_what_leaves_malloc_to_the_user_is_named(env, named):
    assert named in memory.left_to(env)


@pytest.mark.parametrize("env", [{}, {"DPTUNE_MALLOC": ""}, {"DPTUNE_MALLOC": "dptune"}, {"DPTUNE_MALLOC": "ON"},
                                 {"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, {"MALLOC_ARENA_MAX": "2"},
                                 {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libgomp.so.1"}])
def test_nothing_of_the_users_leaves_malloc_to_dptune(env):
    """Settings that are not glibc's thresholds (arenas, CPU tunables, a preloaded OpenMP) leave them to
    dptune; whether malloc itself is glibc's is asked of the process (``glibc``), not of LD_PRELOAD."""
    assert memory.left_to(env) is None


@pytest.mark.parametrize("value", ["jemalloc", "2", "sys"])
def test_an_unknown_dptune_malloc_value_is_one_line(value):
    from dptune.errors import ConfigError

    with pytest.raises(ConfigError, match=f"DPTUNE_MALLOC='{value}': 'system'"):
        memory.left_to({"DPTUNE_MALLOC": value})


def test_a_run_says_why_it_leaves_malloc_alone_and_an_unknown_value_stops_it(tmp_path):
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
            "from dptune.cli import main\n"
            "sys.exit(main(['fit', '--config', 'configs/quickstart.yaml', '--trainer.max_steps', '1', "
            "'--trainer.limit_val_batches', '0', '--data.splits', sys.argv[1], "
            "'--trainer.default_root_dir', sys.argv[2]]))")
    splits = json.dumps({"train": {"count": 16, "seed": 0, "size": [64, 64]}, "val": {"count": 8, "seed": 1, "size": [64, 64]}})
    from conftest import REPO

    said = subprocess.run([sys.executable, "-c", code, splits, str(tmp_path / "a")], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, MALLOC_TOP_PAD_="0", WANDB_MODE="offline"))
    assert "glibc malloc left as it is (MALLOC_TOP_PAD_ set in the environment)" in said.stdout + said.stderr
    bad = subprocess.run([sys.executable, "-c", code, splits, str(tmp_path / "b")], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, DPTUNE_MALLOC="jemalloc", WANDB_MODE="offline"))
    err = [line for line in bad.stderr.splitlines() if line.startswith("error")]
    assert bad.returncode == 2 and len(err) == 1 and "DPTUNE_MALLOC='jemalloc'" in err[0], bad.stderr[-2000:]


INTERPOSER = """
#include <stddef.h>
extern void *__libc_malloc(size_t);
void *malloc(size_t n) { return __libc_malloc(n); }
"""


def test_an_allocator_preloaded_in_glibcs_place_is_left_alone(tmp_path):
    """A library that serves malloc itself (as jemalloc or tcmalloc do, here a stand-in that forwards to
    glibc): dptune's thresholds would tune an allocator the process does not use, so it leaves them."""
    import shutil

    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the stand-in allocator")
    (tmp_path / "m.c").write_text(INTERPOSER)
    lib = tmp_path / "libstandin.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "m.c")], check=True)
    code = "from dptune.training import memory; print(memory.glibc() is None, memory.keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, LD_PRELOAD=str(lib))).stdout.split()
    assert out == ["True", "None"]
    assert memory.glibc() is not None  # this process: glibc's own malloc


SPAWNED = """
import os, resource, sys, torch, lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset
from dptune.training.hardware import DPTuneTrainer
""" + FAULTS + """

class M(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(2, 1)
    def training_step(self, batch, i):
        if i == 0:
            from dptune.training import memory
            kept = bool(memory.keep_freed_memory() is None and memory._said and memory._said.startswith("glibc malloc keeps"))
            print(f"rank {self.global_rank} pid {os.getpid()} faults {faults(5)} kept {kept}", flush=True)
        return self.l(batch[0]).sum()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

if __name__ == "__main__":
    trainer = DPTuneTrainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(M(), DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2))
    print("parent", os.getpid())
"""


@pytest.mark.slow
def test_the_processes_a_spawned_ddp_run_trains_in_keep_freed_memory_too(tmp_path):
    """ddp_spawn trains in new interpreters that never run the Trainer's ``__init__``: each sets the
    thresholds where the run is set up in it (before, only the launching process had them)."""
    script = tmp_path / "spawned.py"
    script.write_text(SPAWNED)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=dict(_clean(), OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [line.split() for line in out.stdout.splitlines() if line.startswith("rank ")]
    parent = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("parent ")]
    assert len(ranks) == 2 and all(r[3] not in parent for r in ranks), out.stdout  # trained in other processes
    # set in each (the fault count itself varies here: a process's other threads may share its main arena)
    assert all(r[7] == "True" for r in ranks), out.stdout


def _tool(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dptune.tools.malloc_step", *args], env=dict(_clean(), **env),
                          capture_output=True, text=True, timeout=600)


def test_the_step_tool_times_both_settings_and_counts_the_faults_it_saves():
    out = _tool("--rounds", "1", "--steps", "5", "--tasks", "depth")
    assert out.returncode == 0, out.stderr[-2000:]
    faults = {line.split()[1]: float(re.search(r"(\d+) faults", line).group(1)) for line in out.stdout.splitlines()
              if line.startswith("depth ") and line.split()[1] in ("dptune", "system")}
    # bf16 (under 32 MiB a tensor) or a glibc that takes a 1 GiB threshold: none; else fewer
    assert faults["dptune"] < (50 if _kept_below() == 1024 or "bf16" in out.stdout else faults["system"]), out.stdout
    assert faults["system"] > 50, out.stdout
    assert "x the steps per second" in out.stdout and "x per CPU second" in out.stdout


def _kept_below() -> int:
    """The MiB below which a fresh process of this machine keeps freed blocks (1024, or 32 on an older glibc)."""
    code = "from dptune.training import memory; print(memory.keep_freed_memory())"
    said = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=_clean()).stdout
    return int(re.search(r"below (\d+) MiB", said).group(1))


def test_an_older_glibc_that_refuses_a_1_gib_threshold_gets_32_mib(monkeypatch):
    """glibc before about 2.35 takes an mmap threshold of at most HEAP_MAX_SIZE / 2 (32 MiB): refused, the
    setting was skipped without a word; now it keeps blocks below 32 MiB and says so."""
    calls = []

    class OldGlibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 0 if param == memory.M_MMAP_THRESHOLD and value > 32 << 20 else 1

    monkeypatch.setattr(memory, "glibc", OldGlibc)
    monkeypatch.setattr(memory, "_said", None)
    for name in (*memory.USER_SETTINGS, memory.OPT_OUT, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    said = memory.keep_freed_memory()
    assert "below 32 MiB" in said
    assert calls == [(memory.M_MMAP_THRESHOLD, 1 << 30), (memory.M_MMAP_THRESHOLD, 32 << 20),
                     (memory.M_TRIM_THRESHOLD, 1 << 30)]
    assert memory.keep_freed_memory() is None  # once per process


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


HELD = """
import sys, torch, lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset
from dptune.training import memory
from dptune.training.hardware import DPTuneTrainer

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20

class M(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(2, 1)
    def training_step(self, batch, i):
        big = [torch.ones(6_000_000) for _ in range(16)]  # 16 x 24 MB made and freed
        return self.l(batch[0]).sum() + sum(float(t[0]) for t in big) * 0
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

if sys.argv[1] == "no-trim":
    memory.give_back_freed_memory = lambda: None
trainer = DPTuneTrainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
before = rss_mib()
trainer.fit(M(), DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2))
print(rss_mib() - before)
"""


def test_what_a_fit_freed_goes_back_to_the_system_when_it_ends():
    """A process that goes on after a fit (a notebook) got back none of the memory the thresholds kept;
    the fit's end now gives what is free back (``malloc_trim``)."""
    if _kept_below() < 1024:
        pytest.skip("this glibc keeps freed blocks below 32 MiB only")

    def grown(how: str) -> int:
        out = subprocess.run([sys.executable, "-c", HELD, how], capture_output=True, text=True, timeout=300,
                             env=_clean())
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    held, trimmed = grown("no-trim"), grown("trim")
    assert held > 300 and trimmed < 100, (held, trimmed)
