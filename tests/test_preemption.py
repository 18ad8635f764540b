"""SIGTERM mid-epoch: exit 0 with a loadable checkpoint; resuming continues from it exactly where
Lightning makes that possible (weights, Adam moments, step, LR schedule)."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from conftest import CAMVID, REPO, needs, run_python
from sigterm_helper import read_log
from test_train import VAL, camvid_args

pytestmark = [pytest.mark.slow, needs(CAMVID)]
TRAIN = {"images": "train/0001TP_0069*.jpg", "masks": "trainannot/{stem}.png"}  # 4 frames: 2 steps/epoch


def _run(args, cwd, extra_env=None):
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO / "tests"), **(extra_env or {}))
    t = time.time()
    proc = run_python(REPO / "train.py", args, cwd, env, timeout=600)
    return proc, time.time() - t


def _args(run, config):
    a = camvid_args(run, config, epochs=3, train=TRAIN)
    a[a.index("--data.splits") + 1] = json.dumps({"train": TRAIN, "val": VAL})
    return [*a, "--trainer.logger", "false"]


def _state_sums(ckpt: dict) -> tuple[float, float]:
    weights = sum(v.double().abs().sum().item() for v in ckpt["state_dict"].values() if v.is_floating_point())
    moments = sum(s["exp_avg"].double().abs().sum().item() for s in ckpt["optimizer_states"][0]["state"].values())
    return weights, moments


def test_sigterm_mid_epoch_then_resume_matches_uninterrupted(tmp_path, tiny_config_path):
    log = "--trainer.callbacks+=sigterm_helper.StepLog"
    full, _ = _run([*_args(tmp_path / "full", tiny_config_path), log, f"--trainer.callbacks.path={tmp_path}/full.log"],
                   tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    ref = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", map_location="cpu")

    run = tmp_path / "cut"
    cut, seconds = _run([*_args(run, tiny_config_path), "--trainer.callbacks+=sigterm_helper.SigtermAt",
                         "--trainer.callbacks.step=3", log, f"--trainer.callbacks.path={tmp_path}/cut.log"], tmp_path)
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert seconds < 60
    assert "SIGTERM: saved" in cut.stderr
    mid = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert mid["global_step"] == 3  # mid-epoch: epoch 1 of 2-step epochs
    assert not list((run / "checkpoints").glob("*.partial"))

    resumed, _ = _run([*_args(run, tiny_config_path), "--ckpt_path", "last", log,
                       f"--trainer.callbacks.path={tmp_path}/cut.log"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    end = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert end["global_step"] == ref["global_step"] == 6
    # the resumed run starts from the checkpoint written at SIGTERM: same weights, same Adam moments
    starts, steps = read_log(tmp_path / "cut.log")
    weights, moments = _state_sums(mid)
    assert starts[-1]["start"] == 3
    assert starts[-1]["weights"] == pytest.approx(weights, rel=1e-9)
    assert starts[-1]["exp_avg"] == pytest.approx(moments, rel=1e-9) and moments > 0
    # and trains every remaining step at the uninterrupted run's learning rate
    _, ref_steps = read_log(tmp_path / "full.log")
    assert [s["step"] for s in steps] == [s["step"] for s in ref_steps] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(steps, ref_steps, strict=True):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12, abs=1e-15)
    # the data order after a mid-epoch resume is not Lightning's to restore (a plain DataLoader has
    # no state), so the weights need not end equal: the loss only has to keep falling
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert end["lr_schedulers"][0]["last_epoch"] == ref["lr_schedulers"][0]["last_epoch"]
