"""Segmentation and depth in one DPT (``models.joint.JointDPT``): one backbone, two necks and heads,
partial labels (a sample may carry a mask, a depth map or both), fixed or learned loss weights,
each task's metrics on its own validation data, and a combined score for "best" checkpoints."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from torch import nn

from dptune.data.base import ValidationSource
from dptune.errors import ConfigError
from dptune.losses import resize_per_sample
from dptune.losses.depth import LOSSES, MIN_VALID, upsample_depth
from dptune.losses.segmentation import check_loss_weight, cross_entropy, upsample
from dptune.metrics import summed_state, warn_if_nonfinite
from dptune.metrics.depth import MIN_DEPTH, DepthMetrics, check_range, valid_depth, warn_if_none_scored
from dptune.metrics.segmentation import ConfusionMatrix, class_map, metrics_from_confmat
from dptune.models import build_model
from dptune.models.depth import build_depth_model
from dptune.models.joint import JointDPT, UncertaintyWeighting, labelled_rows
from dptune.tasks.base import DPTTask
from dptune.tasks.depth import check_data_range, check_depth_precision
from dptune.tasks.segmentation import LabelledTask, say_unused_aux_weight, set_aux_weight
from dptune.tasks.visuals import joint_samples, log_validation_images

log = logging.getLogger(__name__)


def delta_m(metrics: dict[str, float], references: dict[str, float]) -> float:
    """The multi-task Delta_m (%) of the literature: the mean over tasks of the relative change against
    the single-task reference, signed so that better is positive (mIoU up, AbsRel down)."""
    signs = {"mIoU": 1.0, "abs_rel": -1.0}
    terms = [signs[k] * (metrics[k] - ref) / ref for k, ref in references.items()]
    return 100.0 * sum(terms) / len(terms)


class MultiTaskModule(LabelledTask, DPTTask):
    task = "multitask"
    conv_parts = ()

    def __init__(
        self,
        label_spec: dict[str, Any] | None = None,
        weighting: Literal["fixed", "uncertainty"] = "uncertainty",
        segmentation_weight: float = 1.0,
        depth_weight: float = 1.0,
        aux_weight: float = 0.4,
        depth_mode: Literal["metric"] = "metric",
        min_depth: float = MIN_DEPTH,
        max_depth: float | None = None,
        depth_loss: Literal["silog", "l1", "berhu"] = "silog",
        init_depth: float = 2.0,
        share_reassemble: bool = False,
        references: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            label_spec: Label set of the segmentation data, filled in from the datamodule.
            weighting: ``uncertainty`` (learned, Kendall et al. 2018) or ``fixed`` (the two weights below).
            segmentation_weight: Weight of the segmentation loss with ``fixed`` weighting.
            depth_weight: Weight of the depth loss with ``fixed`` weighting.
            aux_weight: Weight of the segmentation auxiliary head's cross-entropy.
            depth_mode: ``metric`` (metres).
            min_depth: Depth ground truth below this is invalid.
            max_depth: Depth ground truth above this is invalid; predictions are clipped to it when scored.
            depth_loss: ``silog``, ``l1`` or ``berhu``.
            init_depth: What a fresh depth head predicts at first (metres).
            share_reassemble: Share the necks' reassemble stage too (fewer weights, less compute).
            references: Single-task figures (``{mIoU: ..., abs_rel: ...}``) for ``val/delta_m``, the
                multi-task Delta_m; monitor it for "best" checkpoints.
            **kwargs: What every task takes: see ``dptune.tasks.base.DPTTask``.
        """
        if label_spec is None:
            raise ConfigError("model.label_spec is empty: it comes from the datamodule's label set")
        if references and set(references) - {"mIoU", "abs_rel"}:
            raise ConfigError("model.references takes mIoU and abs_rel")
        check_range(min_depth, max_depth)
        super().__init__(**kwargs)

    def validation_keys(self) -> list[str]:
        keys = ["val/mIoU", "val/pixel_acc", "val/abs_rel", "val/rmse", "val/delta1", "val/*/mIoU", "val/*/abs_rel"]
        return [*keys, "val/delta_m"] if self.hparams.references else keys

    def monitor_hint(self, monitor: str) -> str:
        if monitor == "val/delta_m" and not self.hparams.references:
            return ("; val/delta_m is logged only with --model.references '{mIoU: M, abs_rel: A}', the single-task "
                    "figures it compares with (docs/joint.md)")
        return ""

    def check_stage(self, stage: str) -> None:
        check_depth_precision(self.trainer)
        if stage == "fit":  # each depth source's data against the range this model trains and scores on
            check_data_range(self.trainer, self.hparams.min_depth, self.hparams.max_depth)
            hp = self.hparams
            check_loss_weight("aux_weight", hp.aux_weight, "the segmentation auxiliary head's share of the loss")
            say_unused_aux_weight(self.model.seg, hp.aux_weight, self.trainer)
            check_loss_weight("segmentation_weight", hp.segmentation_weight, "the segmentation loss's share (fixed weighting)")
            check_loss_weight("depth_weight", hp.depth_weight, "the depth loss's share (fixed weighting)")
        super().check_stage(stage)

    def configure_models(self) -> None:
        hp = self.hparams
        seg = build_model(self.label_set.names, hp.pretrained, hp.config, self.built_attention, hp.backbone,
                          hp.fresh_init)
        depth = build_depth_model(hp.pretrained, hp.config, self.built_attention, hp.backbone, hp.fresh_init,
                                  hp.depth_mode, hp.max_depth, hp.init_depth)
        self.model = JointDPT(seg, depth, hp.share_reassemble)
        set_aux_weight(seg, hp.aux_weight)

    def configure_losses(self) -> None:
        """Learned task weights (``uncertainty``) are the task's own parameters, beside the network:
        ``param_groups`` gives them the ``task`` group."""
        self.weights = UncertaintyWeighting(["segmentation", "depth"]) if self.hparams.weighting == "uncertainty" else None

    def configure_metrics(self) -> None:
        self.val_confmat = ConfusionMatrix(self.num_classes)
        self.val_depth = DepthMetrics(self.hparams.min_depth, self.hparams.max_depth)
        self.configure_source_metrics([])

    def configure_source_metrics(self, sources: list[ValidationSource]) -> None:
        """Each source's own figures too (``val/<name>/mIoU``, ``val/<name>/abs_rel``) when a task
        validates on several sources; ``per_source`` is keyed by the source's loader index."""
        self.val_names = [s.name for s in sources]
        self._undeclared_said = False
        seg = [k for k, s in enumerate(sources) if s.masks]
        depth = [k for k, s in enumerate(sources) if s.depth]
        # a task no declared source validates on has NaN figures by design: said once, here, not as a data problem
        self.unvalidated = [task for task, ks in (("segmentation", seg), ("depth", depth)) if sources and not ks]
        for task in self.unvalidated if self._trainer is None or self.trainer.is_global_zero else []:
            log.warning("no validation source has %s: the %s figures are NaN (give a %s source a val split to score it)",
                        "masks" if task == "segmentation" else "depth maps", task, task)
        self.per_source = nn.ModuleDict(
            {**({f"seg{k}": ConfusionMatrix(self.num_classes) for k in seg} if len(seg) > 1 else {}),
             **({f"depth{k}": DepthMetrics(self.hparams.min_depth, self.hparams.max_depth)
                 for k in depth} if len(depth) > 1 else {})}).to(self.device)

    def network_forward(self, model: nn.Module, pixel_values: torch.Tensor, seg_rows=None, depth_rows=None,
                        with_aux: bool = False):
        return model(pixel_values, seg_rows, depth_rows, with_aux)

    def forward(self, images: torch.Tensor, seg_rows=None, depth_rows=None, with_aux: bool = False):
        return self._run(self.model, self.normalize(images), seg_rows, depth_rows, with_aux)

    def valid_depth(self, depth: torch.Tensor) -> torch.Tensor:
        return valid_depth(depth, self.hparams.min_depth, self.hparams.max_depth)

    def task_metadata(self) -> dict[str, Any]:
        return {"segmentation": {"labels": self.label_set.to_dict()},
                "depth": {"mode": self.hparams.depth_mode, "units": "metres", "min_depth": self.hparams.min_depth,
                          "max_depth": self.hparams.max_depth},
                "depth_model_config": self.model.depth.config.to_dict()}

    # ------------------------------------------------------------------ training
    def losses(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each task's loss from the samples (and pixels) that carry its label, and a zero that
        still reaches the heads of a task with no sample in the batch: added to the total, it gives
        their weights a (zero) gradient, so every DDP process reduces the same parameters."""
        mask, depth = batch["mask"].long(), batch["depth"]
        # a depth row is one the depth loss can use: enough pixels inside [min_depth, max_depth]; one
        # without (depth beyond max_depth, a few pixels) would make a 0 loss the learned weighting and
        # the logged loss would count
        seg_rows, depth_rows = labelled_rows(mask, self.valid_depth(depth), min_valid=MIN_VALID)
        logits, aux, pred = self(batch["image"], seg_rows, depth_rows, with_aux=self.hparams.aux_weight > 0)
        out: dict[str, torch.Tensor] = {}
        unused = [t for t in (logits, aux, pred) if t is not None and t.shape[0] == 0]
        if len(seg_rows):
            target = mask[seg_rows]
            out["segmentation"] = cross_entropy(upsample(logits, target.shape[-2:]), target)
            if aux is not None:
                out["segmentation"] = out["segmentation"] + self.hparams.aux_weight * cross_entropy(aux, target)
        if len(depth_rows):
            gt = depth[depth_rows]
            out["depth"] = LOSSES[self.hparams.depth_loss](upsample_depth(pred.float(), gt.shape[-2:]), gt,
                                                          self.valid_depth(gt))
        return out, sum((t.float().sum() for t in unused), torch.zeros((), device=self.device))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses, unused = self.losses(batch)
        if self.weights is not None:
            total = self.weights(losses)
            for task, w in self.weights.weights().items():
                self.log(f"train/weight_{task}", w)
        else:
            w = {"segmentation": self.hparams.segmentation_weight, "depth": self.hparams.depth_weight}
            total = sum(w[t] * v for t, v in losses.items())
        bs = batch["image"].shape[0]
        for task, value in losses.items():
            self.log(f"train/loss_{task}", value, batch_size=bs)
        if losses:  # a batch with no label any loss can use has no loss to average in (its total is a zero)
            self.log("train/loss", total, prog_bar=True, batch_size=bs)
        return total + unused

    # ------------------------------------------------------------------ validation: each source on its own data
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """A batch of one source: masks, depth or both, scored at each sample's own label size."""
        if dataloader_idx >= len(self.val_names) and dataloader_idx > 0 and not self._undeclared_said:
            self._undeclared_said = True
            log.warning("validation loader %d has no declared source (the datamodule has no validation_sources()): "
                        "its samples count only in the overall figures, with no per-source ones", dataloader_idx)
        none = torch.tensor([], dtype=torch.long)
        seg, dep = "mask" in batch, "depth" in batch
        logits, _, pred = self(batch["image"], None if seg else none, None if dep else none)
        out: dict[str, Any] = {}
        if seg:
            target = batch["mask"].long()
            scores = resize_per_sample(logits.float(), batch["sizes"], target.shape[-2:], upsample)
            out["preds"] = class_map(scores)
            for metric in self._metrics(self.val_confmat, f"seg{dataloader_idx}"):
                metric.update(out["preds"], target, scores)
        if dep:
            gt = batch["depth"]
            out["depth"] = resize_per_sample(pred.float(), batch["sizes"], gt.shape[-2:], upsample_depth)
            for metric in self._metrics(self.val_depth, f"depth{dataloader_idx}"):
                metric.update(out["depth"], gt, self.valid_depth(gt))
        return out

    def _metrics(self, overall: nn.Module, source: str) -> list[nn.Module]:
        """The task's overall metric and, with several sources of the task, this source's own."""
        return [overall, self.per_source[source]] if source in self.per_source else [overall]

    def on_validation_epoch_end(self) -> None:
        seg = metrics_from_confmat(self.val_confmat.compute())
        overflow = 0
        if not self.trainer.sanity_checking:
            overflow = warn_if_nonfinite(self.val_confmat, "val segmentation")
            warn_if_nonfinite(self.val_depth, "val depth")
        images = {"segmentation": int(summed_state(self.val_confmat, "images")),
                  "depth": int(summed_state(self.val_depth, "images"))}
        self.val_confmat.reset()
        depth = {k: float(v) for k, v in self.val_depth.compute().items()}
        self.val_depth.reset()
        # a task with nothing scored has no figures (NaN): they must not look perfect, nor count in delta_m
        miou = float(torch.nan_to_num(seg["mIoU"].float())) if images["segmentation"] and not overflow else math.nan
        values = {"mIoU": miou, "pixel_acc": float(seg["pixel_acc"]) if images["segmentation"] else math.nan,
                  **{k: depth[k] for k in ("abs_rel", "rmse", "delta1")}}
        for key, metric in self.per_source.items():
            name = self.val_names[int(key.removeprefix("seg").removeprefix("depth"))]
            if key.startswith("seg"):
                confmat = metric.compute()  # NaN when this source scored nothing, as the overall figure
                values[f"{name}/mIoU"] = (float(torch.nan_to_num(metrics_from_confmat(confmat)["mIoU"].float()))
                                          if confmat.sum() else math.nan)
            else:
                values[f"{name}/abs_rel"] = float(metric.compute()["abs_rel"])
            metric.reset()
        if self.hparams.references:
            values["delta_m"] = delta_m(values, self.hparams.references)
        for key, value in values.items():
            self.log(f"val/{key}", value, prog_bar=key in ("mIoU", "abs_rel", "delta_m"))
        self.last_metrics["val"] = values
        # each task's full figures, for its exported directory's model card
        self.last_metrics["segmentation"] = {"val": {**{k: (v.tolist() if k == "IoU" else float(v)) for k, v in seg.items()},
                                                     "images": images["segmentation"]}}
        self.last_metrics["depth"] = {"val": {**depth, "images": images["depth"]}}
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            if "depth" not in self.unvalidated:
                warn_if_none_scored(images["depth"], "val", self.hparams.min_depth, self.hparams.max_depth)
            if not images["segmentation"] and "segmentation" not in self.unvalidated:
                log.warning("val: no segmentation image had a labelled pixel: the segmentation figures are NaN (no "
                            "result)")
            log.info("epoch %d step %d val: %s", self.current_epoch, self.global_step,
                     " ".join(f"{k} {v:.4f}" for k, v in values.items()))

    # ------------------------------------------------------------------ visuals (drawn by tasks/visuals.py)
    def visual_samples(self, batch: dict[str, Any], outputs: dict[str, Any], n: int) -> list[dict[str, Any]]:
        """Image with ground truth and prediction of whichever tasks the batch's source labels."""
        return joint_samples(batch, outputs, n)

    def log_visuals(self, logger, samples: list[dict[str, Any]], step: int) -> None:
        """Class overlays of the segmentation samples, depth panels of the depth samples, per-class IoU."""
        seg = (self.last_metrics.get("segmentation") or {}).get("val") or {}
        log_validation_images(logger, step, self.label_set.names, seg.get("IoU"),
                              seg=[s["seg"] for s in samples if "seg" in s],
                              depth=[s["depth"] for s in samples if "depth" in s])
