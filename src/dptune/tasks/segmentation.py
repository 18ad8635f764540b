"""SegmentationModule: owns the model, loss, metrics, optimizer and schedule."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn

from dptune.data.transforms import processor_backend
from dptune.errors import ConfigError
from dptune.labels import LabelSet
from dptune.losses.segmentation import cross_entropy, dice_loss, lovasz_loss, upsample
from dptune.metrics.segmentation import ConfusionMatrix, metrics_from_confmat
from dptune.models import build_model, segment
from dptune.models.backbones import default_normalization, family
from dptune.models.dpt_backbone import input_multiple
from dptune.tasks.optim import WarmupPoly, param_groups

log = logging.getLogger(__name__)


def _processor_mean_std(pretrained: str) -> tuple[list[float], list[float]] | None:
    """The checkpoint's own normalisation, if it ships an image processor config."""
    try:
        from transformers.utils import cached_file

        path = cached_file(pretrained, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    if not path:
        return None
    cfg = json.loads(Path(path).read_text())
    if "image_mean" in cfg and "image_std" in cfg:
        return list(cfg["image_mean"]), list(cfg["image_std"])
    return None


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


def wants_sync_batchnorm(trainer) -> bool:
    """SyncBatchNorm for multi-process GPU runs (NCCL); it has no CPU implementation."""
    return trainer is not None and trainer.world_size > 1 and trainer.strategy.root_device.type == "cuda"


class SegmentationModule(pl.LightningModule):
    def __init__(
        self,
        pretrained: str | None = None,
        config: str | dict[str, Any] | None = None,
        backbone: str | None = None,
        label_spec: dict[str, Any] | None = None,
        image_size: int | list[int] = 384,
        val_mode: Literal["resize", "slide"] = "resize",
        slide_stride: float = 2 / 3,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-4,
        momentum: float = 0.9,
        head_lr_mult: float = 10.0,
        layer_decay: float = 1.0,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.05,
        warmup_steps: int | None = None,
        poly_power: float = 1.0,
        min_lr_ratio: float = 0.0,
        aux_weight: float = 0.4,
        class_weights: list[float] | None = None,
        region_loss: Literal["none", "dice", "lovasz"] = "none",
        region_weight: float = 1.0,
        head_dropout: Literal["channel", "element", "none"] = "channel",
        attn_implementation: str = "sdpa",
        fresh_init: Literal["he", "hf"] = "he",
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        gradient_checkpointing: bool = False,
        sync_batchnorm: bool = True,
        compile: bool = False,
        channels_last: bool = False,
        log_images: int = 4,
    ) -> None:
        """
        Args:
            pretrained: Hub id or local directory of a DPT checkpoint (e.g. ``Intel/dpt-large-ade``).
            config: ``DPTConfig`` JSON file (or dict) for a randomly initialised model.
                ``pretrained`` and ``config`` may also name a bare backbone (e.g. ``facebook/dinov2-small``
                or a ``"model_type": "dinov2"`` JSON): it gets a fresh DPT neck and heads.
            backbone: Backbone family the model must be: ``vit`` (DPT's own), ``hybrid`` (DPT-Hybrid),
                ``swinv2``, ``beit``, ``dinov2`` or another ``transformers`` backbone type. Optional; a
                mismatch with what ``pretrained``/``config`` holds is an error.
            label_spec: Label set, filled in from the datamodule (``link_arguments``); do not set by hand.
            image_size: Evaluation/export size, filled in from ``data.image_size``.
            val_mode: Filled in from ``data.val_mode``: ``resize`` scores whole images resized to
                ``image_size``; ``slide`` scores at native resolution with ``image_size`` windows.
            slide_stride: Window stride as a fraction of the window (``slide`` mode).
            optimizer: ``adamw`` (default) or ``sgd`` with momentum (the DPT paper's ADE20K recipe).
            lr: Peak learning rate of the ViT backbone.
            momentum: SGD momentum.
            head_lr_mult: The neck and heads (newly initialised classifiers included) train at ``lr * head_lr_mult``.
            layer_decay: Layer-wise learning-rate decay of the backbone: block ``i`` of ``n`` trains at
                ``lr * layer_decay ** (n + 1 - i)``, the embeddings at ``lr * layer_decay ** (n + 1)``.
                ``1.0`` (default) turns it off; the BEiT recipe uses 0.9.
            weight_decay: Weight decay; never applied to norms, biases, position embeddings and CLS token.
            betas: AdamW betas.
            warmup_ratio: Linear warmup length as a fraction of all optimizer steps.
            warmup_steps: Linear warmup length in optimizer steps (overrides ``warmup_ratio``).
            poly_power: Exponent of the polynomial decay after warmup.
            min_lr_ratio: Final learning rate as a fraction of the peak.
            aux_weight: Weight of the auxiliary head's cross-entropy (0 turns it off).
            class_weights: Per-class cross-entropy weights (length = number of classes); see
                ``scripts/inspect_data.py --class-weights``.
            region_loss: Add a region loss to the main head's cross-entropy: ``dice`` (soft Dice over
                the classes present in the batch), ``lovasz`` (Lovasz-softmax, a surrogate of 1 - IoU
                per present class, scored on every 2nd pixel) or ``none``.
            region_weight: Weight of the region loss.
            head_dropout: Dropout in the heads: ``channel`` (Dropout2d), ``element`` (as in HF) or ``none``.
            attn_implementation: ``sdpa`` or ``eager`` attention.
            fresh_init: How the convolutional neck and heads start where they have no pretrained
                weights (a model from ``config``, a bare backbone, a checkpoint without a segmentation
                head): ``he`` (He-normal; default) or ``hf`` (``transformers``' N(0, 0.02), which
                leaves a DPT trained from scratch stuck on the largest classes; docs/benchmarks.md).
            image_mean: Normalisation mean (0-1 scale); default: the checkpoint's image processor, else the
                backbone family's published statistics (0.5 for DPT's ViT/Hybrid and BEiT, ImageNet's for
                DINOv2 and Swin); the log says which was used.
            image_std: Normalisation std; default as for ``image_mean``.
            gradient_checkpointing: Recompute ViT activations in backward to save memory.
            sync_batchnorm: In multi-GPU runs, synchronise the BatchNorm statistics of the fusion
                blocks and heads across processes (GPU only; CPU/gloo runs keep plain BatchNorm).
            compile: ``torch.compile`` the forward pass (pays a compile at start; pays off on long GPU runs).
            channels_last: Channels-last memory format for the convolutional neck and heads (GPU).
            log_images: Validation overlays (image, ground truth, prediction) logged per epoch.
        """
        super().__init__()
        self.save_hyperparameters()
        if label_spec is None:
            raise ConfigError("model.label_spec is empty: it comes from the datamodule's label set (see train.py)")
        self.label_set = LabelSet.from_dict(label_spec, source="model.label_spec")
        self.num_classes = self.label_set.num_classes
        self.model = build_model(
            self.label_set.names, pretrained, config, attn_implementation, backbone, fresh_init
        )
        _set_head_dropout(self.model, head_dropout)
        if aux_weight <= 0 and self.model.auxiliary_head is not None:
            self.model.auxiliary_head.requires_grad_(False)  # never run (see forward), so never trained
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if channels_last:
            for part in (self.model.neck, self.model.head, self.model.auxiliary_head):
                if part is not None:
                    part.to(memory_format=torch.channels_last)
        self._segment = torch.compile(segment) if compile else segment
        mean, std = self._mean_std(pretrained, image_mean, image_std)
        self.image_mean, self.image_std = mean, std
        # x_uint8 * scale + shift == (x / 255 - mean) / std, fused into one multiply-add
        self.register_buffer("_scale", (1.0 / (255.0 * torch.tensor(std))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_shift", (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1), persistent=False)
        if class_weights is not None and len(class_weights) != self.num_classes:
            raise ConfigError(f"model.class_weights has {len(class_weights)} values for {self.num_classes} classes")
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)
        self.val_confmat = ConfusionMatrix(self.num_classes)
        self.test_confmat = ConfusionMatrix(self.num_classes)
        self.last_metrics: dict[str, Any] = {}

    def _mean_std(self, pretrained, mean, std) -> tuple[list[float], list[float]]:
        """The normalisation, from (in order) the settings, the checkpoint's image processor, or
        the backbone family's published statistics; one log line says which."""
        if mean is not None and std is not None:
            log.info("normalisation: mean %s std %s (model.image_mean/image_std)", list(mean), list(std))
            return list(mean), list(std)
        found = _processor_mean_std(pretrained) if pretrained else None
        known = True
        if found is not None:
            why = f"{pretrained}'s preprocessor_config.json"
        else:
            m, s, known = default_normalization(self.model.config)
            found, kind = (list(m), list(s)), family(self.model.config)
            why = (f"the {kind} family's published statistics" if known else
                   f"ImageNet statistics: no image processor and no known default for the {kind!r} family; "
                   "set model.image_mean/image_std if its checkpoints used others")
            if pretrained:
                why = f"{pretrained} ships no preprocessor_config.json; {why}"
        mean, std = list(mean or found[0]), list(std or found[1])
        (log.info if known else log.warning)("normalisation: mean %s std %s (%s)", mean, std, why)
        return mean, std

    def check_sizes(self, **sizes: Any) -> None:
        """Image, crop and window sizes must be multiples of what the backbone divides by."""
        m = input_multiple(self.model.config)
        for what, size in sizes.items():
            pair = [size, size] if isinstance(size, int) else list(size or [])
            if any(int(v) % m for v in pair):
                fix = [max(m, round(int(v) / m) * m) for v in pair]
                raise ConfigError(f"data.{what} {pair} is not a multiple of {m} (the backbone's patch size / stride); "
                                 f"use e.g. {fix}")

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        self.check_sizes(image_size=self.hparams.image_size, crop_size=getattr(dm, "crop_size", None))
        # before the strategy wraps the model in DDP
        if self.hparams.sync_batchnorm and wants_sync_batchnorm(self.trainer):
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            log.info("BatchNorm layers synchronised across %d processes", self.trainer.world_size)

    # ------------------------------------------------------------------ forward and loss
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self._shift, images.float(), self._scale)

    def forward(self, images: torch.Tensor, with_aux: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 (B, 3, H, W) images -> (logits, auxiliary logits or None).

        The auxiliary head runs only when the loss will read it (training with ``aux_weight > 0``)
        unless ``with_aux`` says otherwise.
        """
        if with_aux is None:
            with_aux = self.training and self.hparams.aux_weight > 0
        return self._segment(self.model, self.normalize(images), with_aux)

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
        preds = logits.argmax(1)
        confmat = self.val_confmat if stage == "val" else self.test_confmat
        confmat.update(preds, target)
        self.log(f"{stage}/loss", cross_entropy(logits, target, self.class_weights), batch_size=target.shape[0],
                 sync_dist=True)
        return {"preds": preds}

    def eval_logits(self, images: torch.Tensor, sizes: list[tuple[int, int]], padded: torch.Size) -> torch.Tensor:
        """Float logits at each sample's label size: whole (resized) images or sliding windows."""
        if self.hparams.val_mode == "slide":
            return self.slide(images, sizes, padded)
        return self.resize_logits(self(images)[0].float(), sizes, padded)

    @staticmethod
    def resize_logits(logits: torch.Tensor, sizes: list[tuple[int, int]], padded: torch.Size) -> torch.Tensor:
        """Logits to each sample's label size (bilinear, as ``transformers`` users upsample);
        padded regions of a mixed-size batch get no prediction (their labels are 255)."""
        if len(set(sizes)) == 1:
            return upsample(logits, sizes[0])
        out = logits.new_zeros(logits.shape[0], logits.shape[1], *padded)
        for b, (h, w) in enumerate(sizes):
            out[b, :, :h, :w] = upsample(logits[b : b + 1], (h, w))[0]
        return out

    def slide(self, images: torch.Tensor, sizes: list[tuple[int, int]], padded: torch.Size) -> torch.Tensor:
        """Sliding-window logits at each image's native size (``image_size`` windows)."""
        from dptune.inference import slide_logits

        size = self.hparams.image_size
        window = (size, size) if isinstance(size, int) else tuple(size)
        stride = [max(1, round(s * self.hparams.slide_stride)) for s in window]
        out = None
        for b, (h, w) in enumerate(sizes):
            logits = slide_logits(lambda x: self(x)[0], images[b : b + 1, :, :h, :w], window, stride)
            if out is None:
                out = logits.new_zeros(len(sizes), logits.shape[1], *padded)
            out[b, :, :h, :w] = logits[0]
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._shared_step(batch, "test")

    def _epoch_metrics(self, stage: str, confmat: ConfusionMatrix) -> None:
        m = metrics_from_confmat(confmat.compute())
        confmat.reset()
        for key in ("mIoU", "pixel_acc", "mAcc"):
            self.log(f"{stage}/{key}", torch.nan_to_num(m[key].float(), nan=0.0), prog_bar=key == "mIoU")
        for name, iou in zip(self.label_set.names, m["IoU"].tolist(), strict=True):
            if not math.isnan(iou):
                self.log(f"{stage}/IoU/{name}", iou)
        self.last_metrics[stage] = {k: (v.tolist() if k == "IoU" else float(v)) for k, v in m.items()}
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            log.info(
                f"epoch {self.current_epoch} step {self.global_step} {stage}: mIoU {self.last_metrics[stage]['mIoU']:.4f}"
                f" pixel_acc {self.last_metrics[stage]['pixel_acc']:.4f} mAcc {self.last_metrics[stage]['mAcc']:.4f}"
            )

    def on_validation_epoch_end(self) -> None:
        self._epoch_metrics("val", self.val_confmat)

    def on_test_epoch_end(self) -> None:
        self._epoch_metrics("test", self.test_confmat)

    # ------------------------------------------------------------------ optimizer
    def param_groups(self) -> list[dict[str, Any]]:
        hp = self.hparams
        return param_groups(self.model, hp.lr, hp.head_lr_mult, hp.weight_decay, hp.layer_decay)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.param_groups(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(self.param_groups(), lr=hp.lr, betas=tuple(hp.betas),
                                    weight_decay=hp.weight_decay, fused=self._fused_adamw())
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ConfigError("the training data is a stream (no length): set --trainer.max_steps for the LR schedule "
                              "and --trainer.val_check_interval in steps")
        total = int(total)
        warmup = hp.warmup_steps if hp.warmup_steps is not None else int(round(hp.warmup_ratio * total))
        sched = WarmupPoly(opt, total, warmup, hp.poly_power, hp.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def _fused_adamw(self) -> bool:
        """The fused AdamW kernel (CPU and CUDA) beats the per-tensor loop, but it unscales
        gradients inside its step, so Lightning cannot clip gradients before it: with
        ``gradient_clip_val`` set the optimizer is the unfused one."""
        if any(p.device.type not in ("cpu", "cuda") for p in self.model.parameters()):
            return False
        clip = self.trainer.gradient_clip_val if self._trainer is not None else None
        return not clip

    # ------------------------------------------------------------------ export support
    def image_processor(self):
        """The ``DPTImageProcessor`` that reproduces validation preprocessing for plain transformers."""
        from transformers import DPTImageProcessor, DPTImageProcessorPil
        from transformers.image_utils import PILImageResampling

        size = self.hparams.image_size
        h, w = (size, size) if isinstance(size, int) else size
        # the class AutoImageProcessor gives the export here, so a checkpoint predicts like its export
        cls = DPTImageProcessor if processor_backend() == "torchvision" else DPTImageProcessorPil
        return cls(
            do_resize=True, size={"height": int(h), "width": int(w)}, resample=PILImageResampling.BICUBIC,
            keep_aspect_ratio=False, ensure_multiple_of=1, do_rescale=True, rescale_factor=1 / 255,
            do_normalize=True, image_mean=self.image_mean, image_std=self.image_std, do_pad=False,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # enough to rebuild the model offline, without the hub (see load_module)
        checkpoint["dptune"] = {
            "model_config": self.model.config.to_dict(),
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "metrics": self.last_metrics,
            # how the metrics were measured (the model card states it)
            "evaluation": {"mode": self.hparams.val_mode, "size": self.hparams.image_size,
                           "stride": self.hparams.slide_stride, "processor_backend": processor_backend()},
        }


def load_checkpoint(path: str, map_location: str = "cpu") -> dict[str, Any]:
    """A checkpoint read with ``weights_only=True`` (tensors and plain types: what dptune writes),
    so that opening a checkpoint cannot run code. One that holds other Python objects is refused,
    unless ``DPTUNE_TRUST_CHECKPOINTS=1`` says its source is trusted."""
    import os
    import pickle

    if os.environ.get("DPTUNE_TRUST_CHECKPOINTS") == "1":
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: holds Python objects beyond tensors and plain types ({first}); loading it could "
                          "run code. If you trust its source, set DPTUNE_TRUST_CHECKPOINTS=1") from None


def load_module(ckpt_path: str, map_location: str = "cpu") -> SegmentationModule:
    """Rebuild a module from a dptune checkpoint without touching the hub."""
    ckpt = load_checkpoint(ckpt_path, map_location)
    if "dptune" not in ckpt or "hyper_parameters" not in ckpt:
        raise ConfigError(f"{ckpt_path}: not a dptune checkpoint (no model config stored)")
    hp = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    hp.update(pretrained=None, config=ckpt["dptune"]["model_config"],
              image_mean=ckpt["dptune"]["image_mean"], image_std=ckpt["dptune"]["image_std"])
    module = SegmentationModule(**hp)
    module.load_state_dict(ckpt["state_dict"])
    module.checkpoint_metrics = ckpt["dptune"].get("metrics", {})
    module.checkpoint_evaluation = ckpt["dptune"].get("evaluation", {"mode": hp.get("val_mode", "resize")})
    return module.eval()
