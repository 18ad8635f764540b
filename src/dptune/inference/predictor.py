"""One interface over a dptune checkpoint and an exported directory, for evaluate and predict."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dptune.errors import ConfigError
from dptune.inference.windows import FLIP_VIEWS, flip_views, from_view, predict_probs, to_view
from dptune.labels import LabelSet
from dptune.models import segment


def exported_labels(ref: str, id2label: dict) -> LabelSet:
    """The label set of an exported directory: dptune.json's (names and colours) when the export
    wrote one, else the names in config.json's id2label with a default palette."""
    import json

    card = Path(ref) / "dptune.json"
    if card.exists():
        labels = LabelSet.from_dict(json.loads(card.read_text())["labels"], source=str(card))
        if labels.names == [id2label[i] for i in sorted(id2label)]:
            return labels
    return LabelSet.from_id2label(id2label, source=ref)


def load_export(ref: str, trust_remote_code: bool = False) -> tuple[torch.nn.Module, object]:
    """(model, image processor) of an exported directory (segmentation or depth), loaded without
    ever asking at a terminal whether to run code shipped with it: ``trust_remote_code`` goes to
    every ``transformers`` loader, and a directory that needs such code (an ``auto_map`` to a class
    ``transformers`` does not have) stops without it in one line saying how to allow it. dptune's
    own exports load with the stock or dptune class and never need it: the ``modeling_dptune.py``
    they ship is for plain ``transformers``. (What ``dptune.models.load_exported`` does, with the
    flag passed on.)"""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForDepthEstimation

    from dptune.models.backbones import model_class

    try:
        cfg = AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
        processor = AutoImageProcessor.from_pretrained(ref, trust_remote_code=trust_remote_code)
        if any("DepthEstimation" in a for a in cfg.architectures or []):
            model = AutoModelForDepthEstimation.from_pretrained(ref, config=cfg, trust_remote_code=trust_remote_code)
        else:
            model = model_class(cfg).from_pretrained(ref, config=cfg)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ConfigError(f"{ref}: the model's config asks to run code shipped with it (auto_map), which is not run "
                          "unless you allow it: give --trust-remote-code if you trust where it came from") from None
    return model, processor


@dataclass
class Predictor:
    model: torch.nn.Module
    labels: LabelSet
    size: tuple[int, int]
    mean: list[float]
    std: list[float]
    device: torch.device
    processor: object = None  # the exported DPTImageProcessor: whole-image inputs bit for bit

    @classmethod
    def load(cls, ref: str, device: str = "cpu", trust_remote_code: bool = False) -> Predictor:
        """``ref``: a dptune ``.ckpt`` or a directory written by ``scripts/export.py``; of a
        segmentation + depth model, its segmentation part. Code shipped with a directory runs only
        with ``trust_remote_code`` (see ``load_export``)."""
        dev = torch.device(device)
        if Path(ref).is_dir():
            from dptune.models.source import joint_part

            ref = joint_part(ref, "segmentation")
            model, proc = load_export(ref, trust_remote_code)
            labels = exported_labels(ref, model.config.id2label)
        else:
            from dptune.tasks.checkpoints import load_module

            module = load_module(ref)
            model = module.model.seg if module.task == "multitask" else module.model
            labels, proc = module.label_set, module.image_processor()
        size = (int(proc.size["height"]), int(proc.size["width"]))
        mean, std = list(proc.image_mean), list(proc.image_std)
        return cls(model.eval().to(dev), labels, size, mean, std, dev, proc)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> logits of the main head."""
        x = images.to(self.device).float() / 255
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return self.normalized_logits((x - mean) / std)

    @torch.no_grad()
    def normalized_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return segment(self.model, pixel_values.to(self.device), with_aux=False)[0]

    def pixel_values(self, image: np.ndarray) -> torch.Tensor:
        """The exported processor's input for one uint8 HxWx3 image. Channels last is said, not
        guessed: ``transformers`` guesses channels first for an image 1 or 3 pixels tall."""
        return self.processor(images=image, return_tensors="pt", input_data_format="channels_last")["pixel_values"]

    def predict(self, image: np.ndarray, mode: str = "whole", flip: bool | str = False,
                scales: tuple[float, ...] = (1.0,), stride: float = 2 / 3) -> tuple[np.ndarray, np.ndarray]:
        """(class indices HxW uint8, top-class probability HxW float32) for one uint8 HxWx3 image.

        A single-view ``whole`` prediction is what plain ``transformers`` computes: the exported
        image processor's input, logits upsampled to the image size, argmax of the logits.
        Test-time augmentation averages class probabilities over the views.
        """
        h, w = image.shape[:2]
        if mode == "whole" and scales == (1.0,) and flip_views(flip) == FLIP_VIEWS["none"]:
            x = self.pixel_values(image)
            lg = torch.nn.functional.interpolate(self.normalized_logits(x).float(), size=(h, w), mode="bilinear",
                                                 align_corners=False)[0].cpu()
            return lg.argmax(0).numpy().astype(np.uint8), lg.softmax(0).max(0).values.numpy()
        probs = self.probs(image, mode, flip, scales, stride)
        conf, pred = probs.max(0)
        return pred.numpy().astype(np.uint8), conf.numpy()

    def probs(self, image: np.ndarray, mode: str = "whole", flip: bool | str = False,
              scales: tuple[float, ...] = (1.0,), stride: float = 2 / 3) -> torch.Tensor:
        """Class probabilities (C, H, W) for one uint8 HxWx3 image at its own size, averaged over
        the views (the image, its flips / turns, each scale)."""
        h, w = image.shape[:2]
        if mode == "whole" and scales == (1.0,):
            x = self.pixel_values(image)
            views = flip_views(flip)
            out = 0
            for turns, flipped in views:
                lg = from_view(self.normalized_logits(to_view(x, turns, flipped)).float(), turns, flipped)
                out = out + torch.nn.functional.interpolate(lg, size=(h, w), mode="bilinear",
                                                            align_corners=False).softmax(1)
            return (out / len(views))[0].cpu()
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        strides = [max(1, round(s * stride)) for s in self.size]
        return predict_probs(self.logits, x, mode=mode, size=self.size, stride=strides, flip=flip,
                             scales=scales)[0].cpu()
