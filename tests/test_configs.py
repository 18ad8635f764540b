"""Every shipped config parses and builds; the ADE20K recipe with a tiny stand-in model and dataset."""

import json

import pytest
import torch
from conftest import CAMVID, DUBAI, REPO, needs
from test_data import _hf_dataset
from transformers import DPTConfig, DPTForSemanticSegmentation

from dptune.cli import DPTuneCLI, trainer_defaults
from dptune.data.datamodule import SegmentationDataModule
from dptune.tasks.segmentation import SegmentationModule


def build(args):
    return DPTuneCLI(SegmentationModule, SegmentationDataModule, trainer_defaults=trainer_defaults(),
                     seed_everything_default=0, run=False, args=args)


def test_ade20k_recipe_builds_with_a_tiny_stand_in(tmp_path, tiny_config):
    names = {i: f"ade{i}" for i in range(150)}
    cfg = DPTConfig(**tiny_config, num_labels=150, id2label=names, label2id={v: k for k, v in names.items()})
    DPTForSemanticSegmentation(cfg).save_pretrained(tmp_path / "stand-in")
    data = _hf_dataset(tmp_path)
    cli = build([
        "--config", str(REPO / "configs" / "ade20k.yaml"),
        "--model.pretrained", str(tmp_path / "stand-in"),
        "--data.labels", json.dumps({"from_checkpoint": str(tmp_path / "stand-in"), "reduce_labels": True}),
        "--data.hf.dataset", str(data), "--data.image_size", "32", "--data.crop_size", "32",
        "--data.batch_size", "2", "--data.num_workers", "0", "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.precision", "32-true",
    ])
    m = cli.model
    assert m.hparams.optimizer == "sgd" and m.hparams.lr == 0.002 and m.hparams.poly_power == 0.9
    assert m.num_classes == 150 and m.label_set.names[3] == "ade3"
    assert cli.datamodule.crop_size == (32, 32) and cli.datamodule.scale_range == (0.5, 2.0)
    assert cli.trainer.max_epochs == 240
    # the optimizer needs a trainer for the step count: fit two steps
    cli.trainer.fit_loop.max_epochs = 1
    cli.trainer.limit_train_batches = 2
    cli.trainer.limit_val_batches = 1
    cli.trainer.fit(m, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    sched = cli.trainer.lr_scheduler_configs[0].scheduler
    assert (sched.total, sched.power, sched.last_epoch) == (2, 0.9, 2)  # poly 0.9 over this run's 2 steps


@needs(CAMVID)
def test_camvid_config_builds(tmp_path, tiny_config_path):
    cli = build(["--config", str(REPO / "configs" / "camvid.yaml"), "--data.root", str(CAMVID),
                 "--model.config", str(tiny_config_path), "--trainer.logger", "false"])
    assert cli.model.label_set.names == cli.datamodule.label_set.names
    assert cli.model.hparams.image_size == cli.datamodule.hparams.image_size  # linked, not written twice


@needs(DUBAI)
def test_dubai_config_builds(tiny_config_path):
    cli = build(["--config", str(REPO / "configs" / "dubai.yaml"), "--data.root", str(DUBAI),
                 "--model.config", str(tiny_config_path), "--trainer.logger", "false"])
    assert cli.datamodule.label_set.mask_format == "rgb" and cli.model.num_classes == 6
    ds = cli.datamodule.dataset("val")
    assert len(ds) == 9


def test_quickstart_config_builds():
    cli = build(["--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.logger", "false"])
    assert cli.model.num_classes == 4


def test_model_needs_exactly_one_source():
    with pytest.raises(Exception, match="exactly one"):
        build(["--config", str(REPO / "configs" / "quickstart.yaml"), "--model.pretrained", "x",
               "--trainer.logger", "false"])


def _stand_in(family: str, path) -> str:
    """A tiny local checkpoint of the kind each backbone preset names on the hub."""
    from transformers import Dinov2Config, Dinov2Model, DPTForDepthEstimation

    from dptune.models import load_config

    if family == "dinov2":  # a bare backbone, like facebook/dinov2-small
        spec = json.loads((REPO / "configs" / "models" / "dinov2-tiny-backbone.json").read_text())
        spec.pop("model_type")
        Dinov2Model(Dinov2Config(**spec)).save_pretrained(path)
    else:  # a DPT depth model with that backbone, like Intel/dpt-swinv2-tiny-256
        DPTForDepthEstimation(load_config(REPO / "configs" / "models" / f"dpt-{family}-tiny.json")).save_pretrained(path)
    return str(path)


@needs(CAMVID)
@pytest.mark.parametrize("family", ["hybrid", "swinv2", "beit", "dinov2"])
def test_backbone_presets_build_with_tiny_stand_ins(tmp_path, family):
    cli = build(["--config", str(REPO / "configs" / "camvid.yaml"),
                 "--config", str(REPO / "configs" / "backbones" / f"{family}.yaml"), "--data.root", str(CAMVID),
                 "--model.pretrained", _stand_in(family, tmp_path / "ckpt"), "--trainer.logger", "false"])
    from dptune.models.backbones import family as family_of

    m = cli.model
    assert family_of(m.model.config) == family and m.hparams.backbone == family
    m.check_sizes(image_size=cli.datamodule.image_size, crop_size=cli.datamodule.crop_size)
    assert m.num_classes == 11 and m.model.head.head[4].out_channels == 11


def test_fsdp_strategy_is_reachable_from_the_command_line():

    from conftest import run_python

    proc = run_python(REPO / "train.py", ["fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
                      "--trainer.strategy", "dptune.training.strategies.DPTFSDPStrategy",
                      "--trainer.strategy.activation_checkpointing", "true", "--print_config"], REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "class_path: dptune.training.strategies.DPTFSDPStrategy" in proc.stdout
    assert "activation_checkpointing: true" in proc.stdout
