"""``precision: auto``: chosen from the machine, said in the log, recorded in the checkpoint, and
never in the way of an explicit ``--trainer.precision``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CAMVID, KITCHEN, REPO, TINY, needs, run_python

from dptune import cores
from dptune.training import hardware, memory
from dptune.training.hardware import resolve_precision

# what torch dispatches on an AVX2-only CPU: both torch's own kernels and oneDNN held to AVX2
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def test_explicit_precision_is_used_as_given():
    for p in ("32-true", "bf16-mixed", "16-mixed", 32):
        assert resolve_precision(p) == (p, "as given")


def test_cpu_without_native_bf16_runs_fp32(monkeypatch):
    monkeypatch.setattr(cores, "cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    assert resolve_precision("auto", "cpu")[0] == "32-true"
    assert "no avx512_bf16" in resolve_precision(None, "cpu")[1]


def test_cpu_with_native_bf16_runs_bf16(monkeypatch):
    monkeypatch.setattr(cores, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert resolve_precision("auto", "cpu") == ("bf16-mixed", "CPU with native bf16 (avx512_bf16, torch dispatches AVX512)")


def test_an_avx2_dispatch_resolves_to_fp32_in_a_fresh_process():
    """The real check, not a patched one: a process whose torch and oneDNN are held to AVX2 (as
    on an AVX2-only EPYC) picks fp32, whatever this machine has."""
    code = "from dptune.training.hardware import resolve_precision; print(resolve_precision('auto', 'cpu')[0])"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **AVX2), capture_output=True,
                         text=True, check=True).stdout.split()[-1]
    assert out == "32-true"


def test_cuda_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "gpu")[0] == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "auto")[0] == "bf16-mixed"
    assert resolve_precision("auto", "cpu")[0] in ("32-true", "bf16-mixed")  # --trainer.accelerator cpu: the CPU decides


def test_a_forked_gpu_strategy_asks_for_an_explicit_precision(monkeypatch):
    """Asking the GPU what it supports starts CUDA, which ddp_fork / ddp_notebook forbid before the fork."""
    from dptune.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: pytest.fail("CUDA started before the fork"))
    with pytest.raises(ConfigError, match="--trainer.precision"):
        resolve_precision("auto", "gpu", "ddp_fork")
    assert resolve_precision("16-mixed", "gpu", "ddp_fork") == ("16-mixed", "as given")


def test_every_shipped_config_says_auto():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        trainer = (yaml.safe_load(path.read_text()) or {}).get("trainer") or {}
        assert trainer.get("precision", "auto") == "auto", path


def _tiny_run(tmp: Path, extra: list[str], env: dict) -> tuple[subprocess.CompletedProcess, Path]:
    config = tmp / "tiny.json"
    config.write_text(json.dumps(TINY))
    run = tmp / "run"
    args = ["fit", "--config", str(REPO / "configs" / "camvid.yaml"), "--data.root", str(CAMVID),
            "--model.config", str(config),
            "--data.splits", json.dumps({"train": {"images": "train/0001TP_0069*.jpg", "masks": "trainannot/{stem}.png"},
                                         "val": {"images": "val/0016E5_0799*.jpg", "masks": "valannot/{stem}.png"}}),
            "--data.image_size", "64", "--data.crop_size", "64", "--data.batch_size", "2", "--data.num_workers", "0",
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(run),
            "--trainer.enable_progress_bar", "false", *extra]
    proc = run_python(REPO / "train.py", args, tmp, dict(os.environ, WANDB_MODE="offline", **env), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, run


@pytest.mark.slow
@needs(CAMVID)
@pytest.mark.parametrize("extra,expect,requested", [
    ([], "32-true", "auto"),                                               # auto on AVX2: fp32, said why
    (["--trainer.precision", "bf16-mixed"], "bf16-mixed", "bf16-mixed"),   # the override wins
])
def test_a_run_logs_and_records_its_precision(tmp_path, extra, expect, requested):
    proc, run = _tiny_run(tmp_path, extra, AVX2)
    chosen = [line for line in proc.stderr.splitlines() if "precision" in line and "chosen" in line]
    assert bool(chosen) == (requested == "auto"), proc.stderr[-3000:]
    if chosen:
        assert "32-true" in chosen[0] and "AVX2" in chosen[0]
    if memory.glibc() is not None and memory.left_to() is None:  # a CPU run's allocator setting, said once
        assert sum("glibc malloc keeps freed blocks" in line for line in proc.stderr.splitlines()) == 1, proc.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["dptune"]["precision"]["precision"] == expect
    assert ckpt["dptune"]["precision"]["requested"] == requested
    from dptune.export import export

    card = (export(str(run / "checkpoints" / "last.ckpt"), tmp_path / "out") / "README.md").read_text()
    assert f"Trained in `{expect}`" in card


def test_threads_are_capped_at_the_usable_cores():
    code = ("import torch; torch.set_num_threads(64); from dptune.training.hardware import fit_threads, usable_cores; "
            "said = fit_threads(); print(torch.get_num_threads(), usable_cores(), bool(said))")
    threads, cores, said = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                          check=True).stdout.split()
    assert threads == cores and said == "True"


def test_the_precision_setting_takes_every_value_lightning_takes_and_auto():
    """dptune spells out Lightning's precision values (its alias is private); a value Lightning adds
    must not be refused by dptune's typed CLI."""
    import typing

    from lightning.fabric import connector

    def flat(tp) -> set:
        args = typing.get_args(tp)
        return {tp} if not args else set().union(*(flat(a) for a in args))

    ours = flat(hardware.PrecisionSetting) - {type(None)}
    assert ours == flat(connector._PRECISION_INPUT) | {"auto"}


@needs(CAMVID)
def test_a_bf16_true_run_trains_validates_and_checkpoints(tmp_path):
    """``--trainer.precision bf16-true`` (weights in bfloat16 too) stopped at the first convolution with
    a RuntimeError traceback: the normalised images stayed float32 while the weights were bfloat16."""
    from test_train import camvid_args, run_train

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    args = camvid_args(tmp_path / "run", cfg, 1)
    args[args.index("--trainer.precision") + 1] = "bf16-true"
    proc = run_train(args, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert "keeps the weights in 16 bits" in proc.stderr  # updates under bfloat16's spacing are lost: said


@needs(KITCHEN)
def test_a_16_bit_true_precision_is_refused_for_depth_in_one_line(tmp_path):
    """bf16-true converts every float tensor of a batch: the ground-truth depth was read in bfloat16
    (2-3 significant digits) by the loss and the metrics -- silently altered data -- until the
    validation panels stopped the run with a traceback. Refused before training, one line."""
    from test_depth_train import DEPTH_TINY, depth_args
    from test_train import run_train

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(DEPTH_TINY))
    args = depth_args(tmp_path / "run", cfg, 1)
    args[args.index("--trainer.precision") + 1] = "bf16-true"
    proc = run_train(args, cwd=tmp_path, check=False)
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert proc.returncode == 2 and len(err) == 1 and "bf16-true" in err[0] and "bf16-mixed" in err[0], proc.stderr[-2000:]
