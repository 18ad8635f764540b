"""Depth prediction from a dptune checkpoint or an exported directory, exactly as plain
``transformers`` computes it: the image processor's input, ``predicted_depth`` upsampled by the
processor's ``post_process_depth_estimation`` (what ``pipeline("depth-estimation")`` returns)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dptune.models.depth import depth_forward


@dataclass
class DepthPredictor:
    model: torch.nn.Module
    processor: object
    device: torch.device
    meta: dict = field(default_factory=dict)  # mode, units, min/max depth, alignment, eval crop

    @property
    def mode(self) -> str:
        return self.meta.get("mode", getattr(self.model.config, "depth_mode", "metric"))

    @classmethod
    def load(cls, ref: str, device: str = "cpu", trust_remote_code: bool = False) -> DepthPredictor:
        """``ref``: a dptune depth ``.ckpt`` or a directory written by ``scripts/export.py``; of a
        segmentation + depth model, its depth part. Code shipped with a directory runs only with
        ``trust_remote_code`` (see ``dptune.inference.predictor.load_export``)."""
        dev = torch.device(device)
        if Path(ref).is_dir():
            from dptune.inference.predictor import load_export
            from dptune.models.source import joint_part

            ref = joint_part(ref, "depth")
            model, processor = load_export(ref, trust_remote_code)
            card = Path(ref) / "dptune.json"
            meta = json.loads(card.read_text()).get("depth", {}) if card.exists() else {}
        else:
            from dptune.tasks.checkpoints import load_module

            module = load_module(ref)
            model = module.model.depth if module.task == "multitask" else module.model
            processor, meta = module.image_processor(), module.checkpoint_meta.get("depth", {})
        return cls(model.eval().to(dev), processor, dev, meta)

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> np.ndarray:
        """float32 HxW depth at the image's own size for one uint8 HxWx3 image (metres in metric mode)."""
        h, w = image.shape[:2]
        # channels last said, not guessed (transformers guesses channels first for an image 1 or 3 pixels tall)
        x = self.processor(images=image, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
        x = x.to(self.device)
        depth = depth_forward(self.model, x).float().cpu()
        out = self.processor.post_process_depth_estimation(_Outputs(depth), target_sizes=[(h, w)])
        # the post-processing squeezes: a map 1 pixel tall or wide would lose that axis
        return out[0]["predicted_depth"].numpy().astype(np.float32).reshape(h, w)


class _Outputs:
    """What ``post_process_depth_estimation`` reads from a model output."""

    def __init__(self, predicted_depth: torch.Tensor) -> None:
        self.predicted_depth = predicted_depth
