"""The task hooks: the base builds a task through configure_models, configure_losses and
configure_metrics in that order; the optimizer covers every trainable parameter of the module
(a learned loss weight outside the network too); per-source metrics are declared from what the
datamodule hands over (validation_sources), once, in setup."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import CAMVID, KITCHEN, TINY, needs

from dptune.data.base import ValidationSource
from dptune.labels import LabelSet
from dptune.tasks.depth import DepthModule
from dptune.tasks.multitask import MultiTaskModule
from dptune.tasks.segmentation import SegmentationModule

SPEC = LabelSet.from_dict({"names": ["a", "b", "c"]}).to_dict()


def _recording(cls):
    class Recording(cls):
        def configure_models(self):
            self.calls = ["models"]
            super().configure_models()

        def configure_losses(self):
            assert hasattr(self, "model") and self.image_mean  # the network and normalisation come first
            self.calls.append("losses")
            super().configure_losses()

        def configure_metrics(self):
            self.calls.append("metrics")
            super().configure_metrics()

    return Recording


@pytest.mark.parametrize("cls,kwargs", [(SegmentationModule, {"label_spec": SPEC}), (DepthModule, {}),
                                        (MultiTaskModule, {"label_spec": SPEC})])
def test_the_base_calls_the_hooks_in_their_order(cls, kwargs):
    module = _recording(cls)(config=dict(TINY), image_size=64, **kwargs)
    assert module.calls == ["models", "losses", "metrics"]


def test_a_subclass_changes_the_joint_metrics_through_its_hook_alone():
    """configure_metrics is where the joint task's metrics come from: an override is all it takes."""
    class NoDepthMetrics(MultiTaskModule):
        def configure_metrics(self):
            super().configure_metrics()
            self.val_depth = torch.nn.Identity()

    module = NoDepthMetrics(label_spec=SPEC, config=dict(TINY), image_size=64)
    assert isinstance(module.val_depth, torch.nn.Identity) and module.val_confmat.num_classes == 3


def _stub_trainer(module, datamodule=None, steps=10):
    trainer = SimpleNamespace(estimated_stepping_batches=steps, gradient_clip_val=None, datamodule=datamodule,
                              world_size=1, is_global_zero=True, precision="32-true",
                              strategy=SimpleNamespace(root_device=torch.device("cpu")))
    module._trainer = trainer
    return trainer


def test_a_learned_loss_weight_outside_the_network_is_optimised_in_exactly_one_group():
    module = MultiTaskModule(label_spec=SPEC, config=dict(TINY), image_size=64, weighting="uncertainty", lr=0.1)
    assert not any(p is module.weights.log_vars for p in module.model.parameters())  # it lives beside the network
    _stub_trainer(module)
    opt = module.configure_optimizers()["optimizer"]
    holding = [g["name"] for g in opt.param_groups for p in g["params"] if p is module.weights.log_vars]
    assert holding == ["task"]
    before = module.weights.log_vars.detach().clone()
    module.train()
    batch = {"image": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8),
             "mask": torch.randint(0, 3, (2, 64, 64), dtype=torch.uint8), "depth": torch.rand(2, 64, 64) + 0.5}
    module.log = lambda *a, **k: None  # no trainer to log to
    module.training_step(batch, 0).backward()
    opt.step()
    assert not torch.equal(module.weights.log_vars.detach(), before)  # the optimizer moved it


class _Declaring:
    """A datamodule that hands over its validation sources and nothing else."""

    def __init__(self, sources):
        self._sources = sources

    def validation_sources(self):
        return self._sources


def test_per_source_metrics_are_declared_once_from_the_datamodules_validation_sources():
    module = MultiTaskModule(label_spec=SPEC, config=dict(TINY), image_size=64)
    sources = [ValidationSource("camvid", masks=True, depth=False), ValidationSource("dubai", masks=True, depth=False),
               ValidationSource("kitchen", masks=True, depth=True), ValidationSource("nyu", masks=False, depth=True)]
    _stub_trainer(module, _Declaring(sources))
    module.setup("validate")
    assert module.val_names == ["camvid", "dubai", "kitchen", "nyu"]
    assert set(module.per_source) == {"seg0", "seg1", "seg2", "depth2", "depth3"}
    kept = dict(module.per_source)
    module.on_validation_epoch_start()  # an epoch start no longer rebuilds them
    assert all(module.per_source[k] is v for k, v in kept.items())

    # a batch of loader 1 (dubai) counts in dubai's own confusion matrix and the overall one
    batch = {"image": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8),
             "mask": torch.randint(0, 3, (2, 64, 64), dtype=torch.uint8), "sizes": [(64, 64), (64, 64)]}
    module.eval()
    with torch.no_grad():
        module.validation_step(batch, 0, dataloader_idx=1)
    assert int(module.per_source["seg1"].images) == 2 == int(module.val_confmat.images)
    assert int(module.per_source["seg0"].images) == 0


def test_one_source_per_task_declares_no_per_source_metrics():
    module = MultiTaskModule(label_spec=SPEC, config=dict(TINY), image_size=64)
    _stub_trainer(module, _Declaring([ValidationSource("camvid", True, False), ValidationSource("kitchen", False, True)]))
    module.setup("validate")
    assert len(module.per_source) == 0 and module.val_names == ["camvid", "kitchen"]


@needs(CAMVID)
@needs(KITCHEN)
def test_the_joint_datamodule_declares_its_validation_sources_in_loader_order():
    from dptune.data.multitask_datamodule import MultiTaskDataModule

    seg = {"root": str(CAMVID), "labels": "labels.yaml",
           "splits": {"train": {"images": "train/0001TP_0069*.jpg", "masks": "trainannot/{stem}.png"},
                      "val": {"images": "val/0016E5_0799*.jpg", "masks": "valannot/{stem}.png"}}}
    depth = {"root": str(KITCHEN), "name": "kitchen",
             "splits": {"train": {"images": "train/rgb/frame-0000[0-1]*.jpg", "depth": "train/depth/{stem}.png"}}}
    dm = MultiTaskDataModule(segmentation=seg, depth=depth, image_size=64, batch_size=2, num_workers=0)
    # the depth source has no validation split: it has no loader, so it is not declared
    assert dm.validation_sources() == [ValidationSource("camvid", masks=True, depth=False)]


def test_a_task_written_for_build_network_is_told_its_hook_is_configure_models():
    """build_network is gone; a subclass that still defines it would have its network silently
    replaced by the stock one, so defining it is refused where the class is written."""
    with pytest.raises(TypeError, match=r"Legacy.build_network.*configure_models"):
        class Legacy(SegmentationModule):
            def build_network(self):
                return None

    from dptune.tasks.base import DPTTask

    class Minimal(DPTTask):
        pass

    with pytest.raises(NotImplementedError, match=r"Minimal.configure_models: set self.model"):
        Minimal(config=TINY)


def test_the_one_collate_gives_float32_depth_whatever_the_items_hold():
    """Depth batches are float32 (what the losses and metrics compute in) for items of any dtype,
    mixed ones included: the first item's dtype does not round the others."""
    from dptune.data.loaders import collate

    def item(i, dtype, hw):
        return {"image": torch.zeros(3, *hw, dtype=torch.uint8), "depth": torch.full(hw, 1.0009765, dtype=dtype),
                "index": i}

    batch = collate([item(0, torch.float16, (4, 4)), item(1, torch.float32, (4, 6)), item(2, torch.float64, (4, 4))])
    assert batch["depth"].dtype == torch.float32
    assert batch["depth"][1, :, :6].eq(torch.tensor(1.0009765, dtype=torch.float32)).all()  # not rounded to fp16
    assert batch["depth"][0, :, 4:].eq(0).all()  # padded as "no depth"


def test_several_validation_loaders_without_declared_sources_are_warned_about(caplog):
    """A datamodule with no validation_sources() gets no per-source figures; with a second loader
    that is said once, rather than its samples silently folding into the overall figures."""
    import logging

    module = MultiTaskModule(label_spec=SPEC, config=dict(TINY), image_size=64)
    _stub_trainer(module, object())  # a datamodule that declares nothing
    module.setup("validate")
    batch = {"image": torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8),
             "mask": torch.randint(0, 3, (1, 64, 64), dtype=torch.uint8), "sizes": [(64, 64)]}
    module.eval()
    with caplog.at_level(logging.WARNING, logger="dptune"), torch.no_grad():
        for idx in (0, 1, 1):
            module.validation_step(batch, 0, dataloader_idx=idx)
    said = [r for r in caplog.records if r.levelno >= logging.WARNING and "validation_sources" in r.getMessage()]
    assert len(said) == 1 and "loader 1" in said[0].getMessage()
    assert int(module.val_confmat.images) == 3
