"""One interface over a dptune checkpoint and an exported directory, for evaluate and predict."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dptune.data.transforms import resize_like_processor
from dptune.inference import predict_probs
from dptune.labels import LabelSet
from dptune.model import segment


@dataclass
class Predictor:
    model: torch.nn.Module
    labels: LabelSet
    size: tuple[int, int]
    mean: list[float]
    std: list[float]
    device: torch.device

    @classmethod
    def load(cls, ref: str, device: str = "cpu") -> Predictor:
        """``ref``: a dptune ``.ckpt`` or a directory written by ``scripts/export.py``."""
        dev = torch.device(device)
        if Path(ref).is_dir():
            from transformers import AutoImageProcessor, DPTForSemanticSegmentation

            model = DPTForSemanticSegmentation.from_pretrained(ref)
            proc = AutoImageProcessor.from_pretrained(ref)
            size = (int(proc.size["height"]), int(proc.size["width"]))
            labels = LabelSet.from_id2label(model.config.id2label, source=ref)
            mean, std = list(proc.image_mean), list(proc.image_std)
        else:
            from dptune.module import load_module

            module = load_module(ref)
            model, labels = module.model, module.label_set
            s = module.hparams.image_size
            size = (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))
            mean, std = module.image_mean, module.image_std
        return cls(model.eval().to(dev), labels, size, mean, std, dev)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> logits of the main head."""
        x = images.to(self.device).float() / 255
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return segment(self.model, (x - mean) / std, with_aux=False)[0]

    def probs(self, image: np.ndarray, mode: str = "whole", flip: bool = False,
              scales: tuple[float, ...] = (1.0,), stride: float = 2 / 3) -> torch.Tensor:
        """Class probabilities (C, H, W) for one uint8 HxWx3 image at its own size.

        ``whole`` resizes exactly like the exported image processor (PIL bicubic), so a
        single-view ``whole`` prediction is what plain ``transformers`` computes.
        """
        h, w = image.shape[:2]
        if mode == "whole" and scales == (1.0,):
            x = torch.from_numpy(resize_like_processor(image, self.size)).permute(2, 0, 1)[None]
            views = [x] + ([x.flip(-1)] if flip else [])
            out = 0
            for k, v in enumerate(views):
                lg = self.logits(v).float()
                lg = lg.flip(-1) if k == 1 else lg
                out = out + torch.nn.functional.interpolate(lg, size=(h, w), mode="bilinear",
                                                            align_corners=False).softmax(1)
            return (out / len(views))[0].cpu()
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        strides = [max(1, round(s * stride)) for s in self.size]
        return predict_probs(self.logits, x, mode=mode, size=self.size, stride=strides, flip=flip,
                             scales=scales)[0].cpu()
