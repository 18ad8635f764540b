"""Segmentation + depth in one model through train.py: CamVid masks and 7-Scenes depth mixed."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CAMVID, KITCHEN, REPO, TINY, needs
from test_train import run_train

from dptune.data.multitask_datamodule import JointTrainSet, source_weights

pytestmark = [needs(CAMVID), needs(KITCHEN)]


@pytest.mark.slow
def test_joint_fit_validates_each_task_and_rebuilds_from_its_checkpoint(tmp_path):
    from dptune.tasks.checkpoints import load_module

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    seg = {"train": {"images": "train/0001TP_0069*.jpg", "masks": "trainannot/{stem}.png"},
           "val": {"images": "val/0016E5_0799*.jpg", "masks": "valannot/{stem}.png"}}
    depth = {"train": {"images": "train/rgb/frame-0000[0-2]*.jpg", "depth": "train/depth/{stem}.png"},
             "val": {"images": "val/rgb/frame-00060[0-4].jpg", "depth": "val/depth/{stem}.png"}}
    run = tmp_path / "run"
    run_train(["fit", "--config", str(REPO / "configs" / "multitask" / "camvid-7scenes.yaml"),
               "--data.segmentation.root", str(CAMVID), "--data.depth.root", str(KITCHEN),
               "--data.segmentation.splits", json.dumps(seg), "--data.depth.splits", json.dumps(depth),
               "--model.config", str(config), "--data.image_size", "64", "--data.batch_size", "4",
               "--data.num_workers", "0", "--trainer.max_epochs", "1", "--trainer.precision", "32-true",
               "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
               "--model.references", json.dumps({"mIoU": 0.3, "abs_rel": 0.2}),
               "--trainer.default_root_dir", str(run)], cwd=tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    val = torch.load(ckpt, map_location="cpu")["dptune"]["metrics"]["val"]
    assert 0 <= val["mIoU"] <= 1 and 0 < val["abs_rel"] < 1
    expected = 100 * ((val["mIoU"] - 0.3) / 0.3 - (val["abs_rel"] - 0.2) / 0.2) / 2
    assert val["delta_m"] == pytest.approx(expected)
    module = load_module(str(ckpt))
    assert module.task == "multitask" and module.model.depth.dpt is module.model.seg.dpt
    assert module.label_set.names[0] == "Sky"


def test_mixed_stream_fills_the_missing_label_and_follows_the_ratio():
    seg = [{"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "mask": torch.ones(4, 4, dtype=torch.uint8), "index": i}
           for i in range(30)]
    depth = [{"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "depth": torch.ones(4, 4), "index": i} for i in range(10)]
    data = JointTrainSet(seg, depth)
    assert len(data) == 40
    assert (data[0]["depth"] == 0).all() and (data[35]["mask"] == 255).all()  # "no label" of the other task
    from torch.utils.data import WeightedRandomSampler

    weights = source_weights(30, 10, 0.25)  # a quarter of the samples from segmentation
    drawn = list(WeightedRandomSampler(weights, 4000, generator=torch.Generator().manual_seed(0)))
    share = sum(k < 30 for k in drawn) / len(drawn)
    assert abs(share - 0.25) < 0.03
