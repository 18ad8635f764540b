"""Semantic segmentation: DPT's segmentation head (+ auxiliary head), cross-entropy with optional
class weights and region losses, confusion-matrix metrics, whole-image or sliding-window validation."""

from __future__ import annotations

import logging
import math
from functools import cached_property
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from dptune.errors import ConfigError
from dptune.labels import LabelSet
from dptune.losses import resize_per_sample
from dptune.losses.segmentation import (
    check_class_weights,
    check_loss_weight,
    cross_entropy,
    cross_entropy_terms,
    dice_loss,
    lovasz_loss,
    upsample,
)
from dptune.metrics import summed_state, warn_if_nonfinite
from dptune.metrics.segmentation import ConfusionMatrix, class_map, metrics_from_confmat
from dptune.models import build_model, segment
from dptune.tasks.base import DPTTask
from dptune.tasks.visuals import log_validation_images, segmentation_samples

log = logging.getLogger(__name__)


def _set_head_dropout(model: nn.Module, kind: str) -> None:
    """Swap the heads' element-wise dropout. Channel dropout (MMSegmentation's choice for decode
    heads) is ~30x cheaper on CPU than drawing a Bernoulli per activation. Dropout has no
    weights, so exported checkpoints are unaffected."""
    if kind == "element":
        return
    for head in (model.head, model.auxiliary_head):
        if head is None:
            continue
        for i, m in enumerate(head.head):
            if isinstance(m, nn.Dropout):
                head.head[i] = nn.Dropout2d(m.p) if kind == "channel" else nn.Identity()


def set_aux_weight(model: nn.Module, aux_weight: float) -> None:
    """A segmentation model's auxiliary head as a run with ``aux_weight`` uses it: the run's weight, not the
    source checkpoint's, in its config (the checkpoint's and the export's config.json: plain transformers
    fine-tuning the export adds that share of a head this run may not have trained), and, at 0, frozen (never
    run, so never trained; DDP needs it so)."""
    if model.auxiliary_head is not None:
        model.config.auxiliary_loss_weight = float(aux_weight)
        if aux_weight <= 0:
            model.auxiliary_head.requires_grad_(False)


def say_unused_aux_weight(model: nn.Module, aux_weight: float, trainer) -> None:
    """A log line where ``aux_weight`` has no effect: the model has no auxiliary head."""
    if aux_weight > 0 and model.auxiliary_head is None and trainer.is_global_zero:
        log.info("model.aux_weight %s: this model has no auxiliary head (use_auxiliary_head false in its config), "
                 "so the segmentation loss is the main head's alone", aux_weight)


class LabelledTask:
    """Mixin of the tasks that predict classes: their label set, read from ``model.label_spec``
    (``self.hparams``) when first asked, so that every ``configure_*`` hook may use it."""

    @cached_property
    def label_set(self) -> LabelSet:
        labels = LabelSet.from_dict(self.hparams.label_spec, source="model.label_spec")
        if labels.num_classes < 2:  # a source's own label set may hold one class; the model's may not
            raise ConfigError(f"the model's label set has 1 class ({labels.names[0]}): a segmentation model "
                              "chooses a class for each pixel, so it needs at least 2; for one class against "
                              "the rest, name the rest too (e.g. names: [background, "
                              f"{labels.names[0]}]) and map its mask values to it")
        return labels

    @property
    def num_classes(self) -> int:
        return self.label_set.num_classes


class SegmentationModule(LabelledTask, DPTTask):
    task = "segmentation"
    conv_parts = ("neck", "head", "auxiliary_head")

    def __init__(
        self,
        label_spec: dict[str, Any] | None = None,
        val_mode: Literal["resize", "slide"] = "resize",
        slide_stride: float = 2 / 3,
        aux_weight: float = 0.4,
        class_weights: list[float] | None = None,
        region_loss: Literal["none", "dice", "lovasz"] = "none",
        region_weight: float = 1.0,
        head_dropout: Literal["channel", "element", "none"] = "channel",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            label_spec: Label set, filled in from the datamodule (``link_arguments``); do not set by hand.
            val_mode: Filled in from ``data.val_mode``: ``resize`` scores whole images resized to
                ``image_size``; ``slide`` scores at native resolution with ``image_size`` windows.
            slide_stride: Window stride as a fraction of the window (``slide`` mode).
            aux_weight: Weight of the auxiliary head's cross-entropy (0 turns it off).
            class_weights: Per-class cross-entropy weights (length = number of classes); see
                ``scripts/inspect_data.py --class-weights``.
            region_loss: Add a region loss to the main head's cross-entropy: ``dice`` (soft Dice over
                the classes present in the batch), ``lovasz`` (Lovasz-softmax, a surrogate of 1 - IoU
                per present class, scored on every 2nd pixel) or ``none``.
            region_weight: Weight of the region loss.
            head_dropout: Dropout in the heads: ``channel`` (Dropout2d), ``element`` (as in HF) or ``none``.
            **kwargs: What every task takes (model source, optimizer, schedule, precision switches): see
                ``dptune.tasks.base.DPTTask``.
        """
        if label_spec is None:
            raise ConfigError("model.label_spec is empty: it comes from the datamodule's label set (see train.py)")
        super().__init__(**kwargs)

    def check_stage(self, stage: str) -> None:
        """The settings a run uses, checked when it starts (a checkpoint that holds an unused one
        still predicts and exports): the loss weights when it trains, the sliding windows' step."""
        hp = self.hparams
        if stage == "fit":
            check_loss_weight("aux_weight", hp.aux_weight, "the auxiliary head's share of the loss")
            check_loss_weight("region_weight", hp.region_weight, "the region loss's share of the loss")
            check_class_weights(hp.class_weights, self.num_classes)
            say_unused_aux_weight(self.model, hp.aux_weight, self.trainer)
        if isinstance(hp.slide_stride, bool) or not 0 < hp.slide_stride <= 1:  # NaN too
            raise ConfigError(f"model.slide_stride {hp.slide_stride}: the sliding windows' step as a fraction of the "
                              "window, above 0 (a 1-pixel step is thousands of windows per image) and at most 1 (no gaps)")
        super().check_stage(stage)

    def configure_models(self) -> None:
        hp = self.hparams
        self.model = build_model(self.label_set.names, hp.pretrained, hp.config, self.built_attention, hp.backbone,
                                 hp.fresh_init)
        _set_head_dropout(self.model, hp.head_dropout)
        set_aux_weight(self.model, hp.aux_weight)

    def configure_losses(self) -> None:
        class_weights = self.hparams.class_weights
        if class_weights is not None and len(class_weights) != self.num_classes:
            raise ConfigError(f"model.class_weights has {len(class_weights)} values for {self.num_classes} classes")
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)

    def configure_metrics(self) -> None:
        self.val_confmat = ConfusionMatrix(self.num_classes)
        self.test_confmat = ConfusionMatrix(self.num_classes)

    def network_forward(self, model: nn.Module, pixel_values: torch.Tensor, with_aux: bool = True):
        return segment(model, pixel_values, with_aux)

    def task_metadata(self) -> dict[str, Any]:
        from dptune.preprocessing import processor_backend

        # how the metrics were measured (the model card states it)
        return {"evaluation": {"mode": self.hparams.val_mode, "size": self.hparams.image_size,
                               "stride": self.hparams.slide_stride, "processor_backend": processor_backend()}}

    # ------------------------------------------------------------------ forward and loss
    def forward(self, images: torch.Tensor, with_aux: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 (B, 3, H, W) images -> (logits, auxiliary logits or None).

        The auxiliary head runs only when the loss will read it (training with ``aux_weight > 0``)
        unless ``with_aux`` says otherwise.
        """
        if with_aux is None:
            with_aux = self.training and self.hparams.aux_weight > 0
        return self._run(self.model, self.normalize(images), with_aux)

    def loss(self, logits: torch.Tensor, aux: torch.Tensor | None, target: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = upsample(logits, target.shape[-2:])  # once, for the cross-entropy and the region loss
        main = cross_entropy(logits, target, self.class_weights)
        out = {"loss": main, "loss_main": main}
        if self.hparams.region_loss == "dice":
            out["loss_dice"] = dice_loss(logits, target)
            out["loss"] = out["loss"] + self.hparams.region_weight * out["loss_dice"]
        elif self.hparams.region_loss == "lovasz":
            out["loss_lovasz"] = lovasz_loss(logits, target, stride=2)
            out["loss"] = out["loss"] + self.hparams.region_weight * out["loss_lovasz"]
        if aux is not None and self.hparams.aux_weight > 0:
            out["loss_aux"] = cross_entropy(aux, target, self.class_weights)
            out["loss"] = out["loss"] + self.hparams.aux_weight * out["loss_aux"]
        return out

    # ------------------------------------------------------------------ steps
    def _shared_step(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        target = batch["mask"].long()
        if stage == "train":
            losses = self.loss(*self(batch["image"]), target)
            bs = target.shape[0]
            self.log("train/loss", losses["loss"], prog_bar=True, batch_size=bs)
            if "loss_aux" in losses:
                self.log("train/loss_main", losses["loss_main"], batch_size=bs)
                self.log("train/loss_aux", losses["loss_aux"], batch_size=bs)
            return losses
        logits = self.eval_logits(batch["image"], batch["sizes"], target.shape[-2:])
        preds = class_map(logits)
        confmat = self.val_confmat if stage == "val" else self.test_confmat
        confmat.update(preds, target, logits)
        total, labelled = cross_entropy_terms(logits, target, self.class_weights)
        self.log_eval_loss(stage, total / labelled.clamp(min=1), labelled)  # the split's mean over labelled pixels
        return {"preds": preds}

    def eval_logits(self, images: torch.Tensor, sizes: list[tuple[int, int]], padded: torch.Size) -> torch.Tensor:
        """Float logits at each sample's label size: whole (resized) images or sliding windows."""
        if self.hparams.val_mode == "slide":
            return self.slide(images, sizes, padded)
        return resize_per_sample(self(images)[0].float(), sizes, padded, upsample)

    def slide(self, images: torch.Tensor, sizes: list[tuple[int, int]], padded: torch.Size) -> torch.Tensor:
        """Sliding-window logits at each image's native size (``image_size`` windows)."""
        from dptune.inference.windows import slide_logits

        window = self.preprocessing.size
        stride = [max(1, round(s * self.hparams.slide_stride)) for s in window]
        out = None
        for b, (h, w) in enumerate(sizes):
            logits = slide_logits(lambda x: self(x)[0], images[b : b + 1, :, :h, :w], window, stride)
            if out is None:
                out = logits.new_zeros(len(sizes), logits.shape[1], *padded)
            out[b, :, :h, :w] = logits[0]
        return out

    def validation_keys(self) -> list[str]:
        return ["val/mIoU", "val/pixel_acc", "val/mAcc", "val/loss", *(f"val/IoU/{n}" for n in self.label_set.names)]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._shared_step(batch, "test")

    def _epoch_metrics(self, stage: str, confmat: ConfusionMatrix) -> None:
        m = metrics_from_confmat(confmat.compute())
        images = int(summed_state(confmat, "images"))
        nonfinite = warn_if_nonfinite(confmat, stage) if not self.trainer.sanity_checking else 0
        confmat.reset()
        if not images and not self.trainer.sanity_checking and self.trainer.is_global_zero:
            # a stream whose every example was skipped: no result (NaN, never a best checkpoint), not a 0
            log.warning("%s: no image was scored; the figures are NaN and no checkpoint is chosen on them", stage)
        for key in ("mIoU", "pixel_acc", "mAcc"):
            value = m[key].float() if nonfinite or not images else torch.nan_to_num(m[key].float(), nan=0.0)
            self.log(f"{stage}/{key}", value, prog_bar=key == "mIoU")
        for name, iou in zip(self.label_set.names, m["IoU"].tolist(), strict=True):
            if not math.isnan(iou):
                self.log(f"{stage}/IoU/{name}", iou)
        self.last_metrics[stage] = {**{k: (v.tolist() if k == "IoU" else float(v)) for k, v in m.items()}, "images": images}
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            log.info(
                f"epoch {self.current_epoch} step {self.global_step} {stage}: mIoU {self.last_metrics[stage]['mIoU']:.4f}"
                f" pixel_acc {self.last_metrics[stage]['pixel_acc']:.4f} mAcc {self.last_metrics[stage]['mAcc']:.4f}"
                f" ({images} images)"
            )

    def on_validation_epoch_end(self) -> None:
        self._epoch_metrics("val", self.val_confmat)

    def on_test_epoch_end(self) -> None:
        self._epoch_metrics("test", self.test_confmat)

    # ------------------------------------------------------------------ visuals (drawn by tasks/visuals.py)
    def visual_samples(self, batch: dict[str, Any], outputs: dict[str, Any], n: int) -> list[dict[str, np.ndarray]]:
        """Image, ground truth and prediction of the first ``n`` samples, at the label size."""
        return segmentation_samples(batch, outputs["preds"], n, native=self.hparams.get("val_mode") == "slide")

    def log_visuals(self, logger, samples: list[dict[str, np.ndarray]], step: int) -> None:
        """A per-class IoU table and overlays with class labels."""
        log_validation_images(logger, step, self.label_set.names, (self.last_metrics.get("val") or {}).get("IoU"),
                              seg=samples)
