"""The shipped depth configs parse and train a step: 7-Scenes as is, NYU and KITTI (which cannot run
here at full size) on real NYU and KITTI frames with tiny stand-in models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DEPTH_FORMATS, KITCHEN, REPO, needs
from PIL import Image
from test_depth_train import DEPTH_TINY
from transformers import DPTConfig, DPTForDepthEstimation

from dptune.cli import DPTuneCLI, task_classes, trainer_defaults

pytestmark = needs(DEPTH_FORMATS)


def build(args: list[str]) -> DPTuneCLI:
    model, data = task_classes("depth")
    return DPTuneCLI(model, data, task="depth", trainer_defaults=trainer_defaults(), seed_everything_default=0,
                     run=False, args=args)


def one_step(cli: DPTuneCLI) -> None:
    cli.trainer.fit_loop.max_epochs = 1
    cli.trainer.limit_train_batches = 1
    cli.trainer.limit_val_batches = 1
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    assert 0 < cli.model.last_metrics["val"]["abs_rel"] < 10


def stand_in(tmp_path) -> str:
    DPTForDepthEstimation(DPTConfig(**DEPTH_TINY)).save_pretrained(tmp_path / "stand-in")
    return str(tmp_path / "stand-in")


COMMON = ["--trainer.logger", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
          "--trainer.precision", "32-true", "--data.num_workers", "0", "--data.batch_size", "2"]


@needs(KITCHEN)
def test_7scenes_config_builds(tmp_path):
    cli = build(["--config", str(REPO / "configs" / "depth" / "7scenes.yaml"), "--data.root", str(KITCHEN),
                 "--model.config", str(REPO / "configs" / "models" / "dpt-tiny.json"), *COMMON,
                 "--trainer.default_root_dir", str(tmp_path)])
    assert cli.model.hparams.mode == "metric" and cli.model.hparams.max_depth == 10.0
    assert cli.datamodule.image_size == (224, 224) and cli.model.hparams.image_size == 224  # linked
    assert cli.model.loss_name == "silog" and cli.model.alignment == "none"


def test_kitti_recipe_on_real_sparse_lidar_frames(tmp_path):
    root = DEPTH_FORMATS / "kitti"
    split = {"images": "rgb/*.png", "depth": "depth/{stem}.png"}
    cli = build(["--config", str(REPO / "configs" / "depth" / "kitti.yaml"), "--data.root", str(root),
                 "--data.splits", json.dumps({"train": split, "val": split}), "--model.pretrained", stand_in(tmp_path),
                 "--data.image_size", "96", "--data.crop_size", "[64, 96]", *COMMON,
                 "--trainer.default_root_dir", str(tmp_path / "run")])
    assert cli.model.hparams.eval_crop == "garg" and cli.datamodule.hparams.depth_scale == 256
    one_step(cli)


def test_nyu_recipe_on_a_hugging_face_stand_in(tmp_path):
    """The NYU recipe reads a hub dataset with float depth columns; here a save_to_disk dataset of the
    three real NYU frames in depth-formats, depth converted to float metres as on the hub."""
    import datasets

    rows = {"image": [], "depth_map": []}
    for f in sorted((DEPTH_FORMATS / "nyu" / "rgb").glob("*.jpg")):
        depth = np.asarray(Image.open(DEPTH_FORMATS / "nyu" / "depth" / f"sync_depth_{f.stem[4:]}.png"))
        rows["image"].append(Image.open(f).convert("RGB"))
        rows["depth_map"].append(depth.astype(np.float32) / 1000)
    feats = datasets.Features({"image": datasets.Image(), "depth_map": datasets.Array2D((480, 640), "float32")})
    ds = datasets.Dataset.from_dict(rows, features=feats)
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "nyu"))
    cli = build(["--config", str(REPO / "configs" / "depth" / "nyu.yaml"), "--data.hf.dataset", str(tmp_path / "nyu"),
                 "--model.pretrained", stand_in(tmp_path), "--data.image_size", "96", *COMMON,
                 "--trainer.default_root_dir", str(tmp_path / "run")])
    assert cli.model.hparams.eval_crop == "eigen"
    sample = cli.datamodule.dataset("val").load(0)[1]
    ref = np.asarray(Image.open(DEPTH_FORMATS / "nyu" / "depth" / "sync_depth_00000.png")).astype(np.float32) / 1000
    assert torch.allclose(torch.from_numpy(sample), torch.from_numpy(ref))
    one_step(cli)


@pytest.mark.parametrize("setting", [["--data.hf.streaming", "true"], ["--data.hf.num_shards", "2"]])
def test_depth_data_asked_to_stream_says_it_is_read_whole(tmp_path, setting):
    """``streaming: true`` on a depth config was dropped without a word (the whole split downloaded);
    ``num_shards`` was a TypeError of the source's constructor."""
    import datasets

    from dptune.errors import DataError

    rows = {"image": [Image.new("RGB", (64, 48))] * 2, "depth_map": [np.ones((48, 64), np.float32)] * 2}
    feats = datasets.Features({"image": datasets.Image(), "depth_map": datasets.Array2D((48, 64), "float32")})
    ds = datasets.Dataset.from_dict(rows, features=feats)
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "hf"))
    cli = build(["--config", str(REPO / "configs" / "depth" / "nyu.yaml"), "--data.hf.dataset", str(tmp_path / "hf"),
                 "--model.pretrained", stand_in(tmp_path), "--data.image_size", "32", *setting, *COMMON,
                 "--trainer.default_root_dir", str(tmp_path / "run")])
    with pytest.raises(DataError, match=rf"data\.hf\.{setting[0].split('.')[-1]}: depth data is read whole, not streamed"):
        cli.datamodule.setup("fit")


def test_an_8_bit_depth_column_without_a_unit_is_refused_as_8_bit_files_are(tmp_path):
    """A Hugging Face depth column of 8-bit pictures (mode L) was read as millimetres (0.255 m at most)
    and passed inspect; folder sources refuse 8-bit depth unless depth_scale says its unit."""
    import datasets

    from dptune.data.depth import HFDepthSource
    from dptune.errors import DataError

    depth = np.random.default_rng(0).integers(1, 255, (48, 64), dtype=np.uint8)
    rows = {"image": [Image.new("RGB", (64, 48))], "depth": [Image.fromarray(depth)]}
    feats = datasets.Features({"image": datasets.Image(), "depth": datasets.Image()})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=feats)}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"hf\[train\]#0: 8-bit integers \(uint8\) where 16-bit"):
        HFDepthSource(str(tmp_path / "hf"), "train").load(0)
    # an Array2D column of uint8 too (its rows come back as lists of Python ints: int64)
    feats = datasets.Features({"image": datasets.Image(), "depth": datasets.Array2D((48, 64), "uint8")})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": rows["image"], "depth": [depth]}, features=feats)}
                         ).save_to_disk(str(tmp_path / "arr"))
    with pytest.raises(DataError, match=r"arr\[train\]#0: 8-bit integers \(uint8\) where 16-bit"):
        HFDepthSource(str(tmp_path / "arr"), "train").load(0)
    _, metres, _ = HFDepthSource(str(tmp_path / "hf"), "train", scale=10.0).load(0)  # a unit given: read
    assert np.allclose(metres, depth / 10.0)
