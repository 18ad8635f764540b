"""SIGTERM mid-epoch: exit 0 with a loadable checkpoint; resuming matches an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import CAMVID, REPO, needs
from test_train import VAL, camvid_args

pytestmark = [pytest.mark.slow, needs(CAMVID)]
TRAIN = {"images": "train/0001TP_0069*.jpg", "masks": "trainannot/{stem}.png"}  # 4 frames: 2 steps/epoch


def _run(args, cwd, extra_env=None):
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO / "tests"), **(extra_env or {}))
    t = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, time.time() - t


def _args(run, config):
    a = camvid_args(run, config, epochs=3, train=TRAIN)
    a[a.index("--data.splits") + 1] = json.dumps({"train": TRAIN, "val": VAL})
    return [*a, "--trainer.logger", "false"]


def test_sigterm_mid_epoch_then_resume_matches_uninterrupted(tmp_path, tiny_config_path):
    full, _ = _run(_args(tmp_path / "full", tiny_config_path), tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    ref = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", map_location="cpu")

    run = tmp_path / "cut"
    cut, seconds = _run([*_args(run, tiny_config_path), "--trainer.callbacks+=sigterm_helper.SigtermAt",
                         "--trainer.callbacks.step=3"], tmp_path)
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert seconds < 60
    assert "SIGTERM: saved" in cut.stderr
    mid = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert mid["global_step"] == 3  # mid-epoch: epoch 1 of 2-step epochs
    assert not list((run / "checkpoints").glob("*.partial"))

    resumed, _ = _run([*_args(run, tiny_config_path), "--ckpt_path", "last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    end = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert end["global_step"] == ref["global_step"] == 6
    lr = [g["lr"] for g in end["optimizer_states"][0]["param_groups"]]
    lr_ref = [g["lr"] for g in ref["optimizer_states"][0]["param_groups"]]
    assert lr == pytest.approx(lr_ref, rel=1e-12, abs=1e-15)
    assert end["lr_schedulers"][0]["last_epoch"] == ref["lr_schedulers"][0]["last_epoch"]
