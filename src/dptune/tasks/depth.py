"""Monocular depth: DPT's depth head (or Depth Anything's), metric or relative output, losses on
valid pixels only, per-image metrics averaged over images, validation panels."""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from dptune.data.depth import eval_crop_mask
from dptune.errors import ConfigError
from dptune.losses import resize_per_sample
from dptune.losses.depth import LOSSES, scored_images, upsample_depth
from dptune.metrics import summed_state, warn_if_nonfinite
from dptune.metrics.depth import MIN_DEPTH, NAMES, DepthMetrics, check_range, valid_depth, warn_if_none_scored
from dptune.models.depth import UNITS, build_depth_model, depth_forward
from dptune.tasks.base import SIXTEEN_BIT_WEIGHTS, DPTTask
from dptune.tasks.visuals import depth_samples, log_validation_images

log = logging.getLogger(__name__)


def check_data_range(trainer, min_depth: float, max_depth: float | None) -> None:
    """The training data's depth against the range a model trains and scores on, where the
    datamodule can tell (``check_model_range``: the depth and the joint datamodules)."""
    dm = getattr(trainer, "datamodule", None)
    if hasattr(dm, "check_model_range"):
        dm.check_model_range(min_depth, max_depth)


def check_depth_precision(trainer) -> None:
    """A ``*-true`` 16-bit precision converts every float tensor of a batch, the ground-truth depth
    too: losses and metrics would read depth rounded to 2-3 significant digits. Refused."""
    p = str(trainer.precision)
    if p in SIXTEEN_BIT_WEIGHTS:
        raise ConfigError(f"--trainer.precision {p}: Lightning converts every float tensor of a batch to 16 bits, the "
                          "ground-truth depth too (2-3 significant digits), so losses and metrics would read rounded "
                          "depth; use bf16-mixed or 16-mixed (weights and targets stay float32)")


class DepthModule(DPTTask):
    task = "depth"

    def __init__(
        self,
        mode: Literal["metric", "relative"] = "metric",
        min_depth: float = MIN_DEPTH,
        max_depth: float | None = None,
        loss: Literal["silog", "ssi", "l1", "berhu"] | None = None,
        alignment: Literal["none", "median", "lstsq"] | None = None,
        init_depth: float = 2.0,
        eval_crop: Literal["none", "eigen", "garg"] = "none",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            mode: ``metric``: depth in metres; ``relative``: affine-invariant inverse depth (what
                MiDaS/DPT checkpoints output), scored after per-image alignment.
            min_depth: Ground truth below this (metres) is invalid; predictions are clipped to it
                when scored.
            max_depth: Ground truth above this is invalid; predictions are clipped to it when scored.
                Depth Anything models in ``metric`` mode get a bounded head (sigmoid x max_depth).
            loss: ``silog`` (scale-invariant log; the default for metric), ``ssi`` (scale-and-shift
                invariant + multi-scale gradient matching, MiDaS; the default for relative), ``l1``
                or ``berhu``. Every loss reads valid pixels only.
            alignment: How predictions are aligned to the ground truth before scoring, per image:
                ``none`` (default for metric), ``median`` (scale) or ``lstsq`` (scale and shift of
                inverse depth; default for relative).
            init_depth: What a fresh depth head predicts at first (metres for metric): the typical
                depth of your scenes (about 2 indoors, 15-20 for driving).
            eval_crop: Filled in from ``data.eval_crop``: ``eigen`` (NYU) or ``garg`` (KITTI) crop.
            **kwargs: What every task takes (model source, optimizer, schedule, precision switches): see
                ``dptune.tasks.base.DPTTask``.
        """
        check_range(min_depth, max_depth)
        super().__init__(**kwargs)

    def check_stage(self, stage: str) -> None:
        check_depth_precision(self.trainer)
        if stage == "fit":  # the data's depth against the range this model trains and scores on
            check_data_range(self.trainer, self.hparams.min_depth, self.hparams.max_depth)
        super().check_stage(stage)

    def configure_models(self) -> None:
        hp = self.hparams
        self.model = build_depth_model(hp.pretrained, hp.config, self.built_attention, hp.backbone, hp.fresh_init,
                                       hp.mode, hp.max_depth, hp.init_depth if hp.mode == "metric" else 1.0)

    def configure_losses(self) -> None:
        hp = self.hparams
        self.loss_name = hp.loss or ("silog" if hp.mode == "metric" else "ssi")
        if hp.mode == "metric" and self.loss_name == "ssi":
            raise ConfigError("model.loss ssi is scale-and-shift invariant: it cannot train metric depth (use silog)")

    def configure_metrics(self) -> None:
        hp = self.hparams
        self.alignment = hp.alignment or ("none" if hp.mode == "metric" else "lstsq")
        if hp.mode == "relative" and self.alignment == "none":
            raise ConfigError("model.alignment none cannot score relative depth (use lstsq or median)")
        align = None if self.alignment == "none" else self.alignment
        self.val_metrics = DepthMetrics(hp.min_depth, hp.max_depth, align)
        self.test_metrics = DepthMetrics(hp.min_depth, hp.max_depth, align)

    def network_forward(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return depth_forward(model, pixel_values)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) images -> (B, h, w) predicted depth (metres, or relative inverse depth)."""
        return self._run(self.model, self.normalize(images))

    def task_metadata(self) -> dict[str, Any]:
        from dptune.preprocessing import processor_backend

        hp = self.hparams
        return {"depth": {"mode": hp.mode, "units": UNITS[hp.mode], "min_depth": hp.min_depth,
                          "max_depth": hp.max_depth, "alignment": self.alignment, "eval_crop": hp.eval_crop,
                          "loss": self.loss_name},
                "evaluation": {"mode": "resize", "size": hp.image_size, "processor_backend": processor_backend()}}

    # ------------------------------------------------------------------ steps
    def valid(self, depth: torch.Tensor) -> torch.Tensor:
        """Ground truth that counts: > 0 (measured) and inside [min_depth, max_depth]."""
        return valid_depth(depth, self.hparams.min_depth, self.hparams.max_depth)

    def loss(self, pred: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        pred = upsample_depth(pred.float(), depth.shape[-2:])
        return LOSSES[self.loss_name](pred, depth, self.valid(depth))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["image"]), batch["depth"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["depth"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        depth = batch["depth"]
        pred = resize_per_sample(self(batch["image"]).float(), batch["sizes"], depth.shape[-2:], upsample_depth)
        valid = self.valid(depth)
        if self.hparams.eval_crop != "none":
            crop = torch.zeros_like(valid)
            for b, (h, w) in enumerate(batch["sizes"]):
                crop[b, :h, :w] = torch.from_numpy(eval_crop_mask((h, w), self.hparams.eval_crop))
            valid &= crop
        (self.val_metrics if stage == "val" else self.test_metrics).update(pred, depth, valid)
        # the split's mean over the images the loss scores (an image without enough valid depth counts in none)
        self.log_eval_loss(stage, LOSSES[self.loss_name](pred, depth, valid), scored_images(valid).sum())
        return {"preds": pred}

    def validation_keys(self) -> list[str]:
        return [*(f"val/{name}" for name in NAMES), "val/loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "test")

    def _epoch_metrics(self, stage: str, metrics: DepthMetrics) -> None:
        values = {k: float(v) for k, v in metrics.compute().items()}
        images = int(summed_state(metrics, "images"))  # metrics.images is this process's own count
        if not self.trainer.sanity_checking:
            warn_if_nonfinite(metrics, stage)
        metrics.reset()
        for name in NAMES:
            self.log(f"{stage}/{name}", values[name], prog_bar=name in ("abs_rel", "delta1"))
        self.last_metrics[stage] = {**values, "images": images}
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            warn_if_none_scored(images, stage, self.hparams.min_depth, self.hparams.max_depth)
            log.info(f"epoch {self.current_epoch} step {self.global_step} {stage}: abs_rel {values['abs_rel']:.4f} "
                     f"rmse {values['rmse']:.4f} delta1 {values['delta1']:.4f} ({images} images)")

    def on_validation_epoch_end(self) -> None:
        self._epoch_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._epoch_metrics("test", self.test_metrics)

    # ------------------------------------------------------------------ visuals (drawn by tasks/visuals.py)
    def visual_samples(self, batch: dict[str, Any], outputs: dict[str, Any], n: int) -> list[dict[str, np.ndarray]]:
        return depth_samples(batch, outputs["preds"], n)

    def log_visuals(self, logger, samples: list[dict[str, np.ndarray]], step: int) -> None:
        log_validation_images(logger, step, depth=samples, relative=self.hparams.mode == "relative")
