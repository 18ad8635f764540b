"""Depth prediction from a dptune checkpoint or an exported directory, exactly as plain
``transformers`` computes it: the image processor's input, ``predicted_depth`` upsampled by the
processor's ``post_process_depth_estimation`` (what ``pipeline("depth-estimation")`` returns)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dptune.inference.loading import load_part, placed
from dptune.metrics import require_finite
from dptune.models.depth import depth_forward, depth_multiple, head_mode
from dptune.models.forward import check_multiple
from dptune.preprocessing import Preprocessing, check_image


@dataclass
class DepthPredictor:
    model: torch.nn.Module
    processor: object
    device: torch.device
    meta: dict = field(default_factory=dict)  # mode, units, min/max depth, alignment, eval crop
    graph: object = None  # an ONNX graph run instead of ``model`` (--backend onnx; see dptune.inference.onnx_runner)

    @property
    def mode(self) -> str:
        """``metric`` or ``relative``: what dptune's export says, else what the checkpoint's config says
        (``head_mode``: the published DPT depth checkpoints, saying nothing, are MiDaS's relative inverse depth)."""
        config = getattr(self.model, "config", None)
        return self.meta.get("mode") or (head_mode(config) if config is not None else None) or "metric"

    @property
    def preprocessing(self) -> Preprocessing:
        """The spec its processor prepares images by (size, resample, mean/std)."""
        return Preprocessing.from_processor(self.processor)

    @classmethod
    def load(cls, ref: str, device: str = "cpu", trust_remote_code: bool = False,
             backend: str = "torch") -> DepthPredictor:
        """``ref``: a dptune depth ``.ckpt`` or a directory written by ``scripts/export.py``; of a
        segmentation + depth model, its depth part (see ``dptune.inference.loading.load_part``).
        ``backend``: ``torch``, or ``onnx`` / ``onnx-int8`` / ``onnx-fp16`` to run the export's graph
        (``predicted_depth`` output)."""
        from dptune.inference.onnx_runner import backend_graph

        graph = backend_graph(ref, backend, device, "predicted_depth")
        dev = torch.device(device)
        part = load_part(ref, "depth", trust_remote_code)
        return cls(placed(part.model, dev), part.processor, dev, part.meta, graph)

    @torch.no_grad()
    def predict(self, image: np.ndarray) -> np.ndarray:
        """float32 HxW depth at the image's own size for one uint8 HxWx3 RGB image (metres in metric
        mode; anything else is a ``ValueError``: see ``dptune.preprocessing.check_image``)."""
        check_image(image)
        h, w = image.shape[:2]
        # channels last said, not guessed (transformers guesses channels first for an image 1 or 3 pixels tall)
        x = self.processor(images=image, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
        if self.graph is not None:  # the size the torch path takes (depth_forward checks it)
            check_multiple(x, depth_multiple(self.model.config))
            depth = torch.from_numpy(self.graph(x)["predicted_depth"])
        else:
            depth = depth_forward(self.model, x.to(self.device)).float().cpu()
        require_finite(depth, "the model's output")
        return resized_depth(self.processor, depth, h, w)


def resized_depth(processor, depth: torch.Tensor, h: int, w: int) -> np.ndarray:
    """float32 HxW: the model's depth output (1, h', w') upsampled by the processor's
    ``post_process_depth_estimation`` to the image's (h, w). Bicubic overshoots an edge, so finite
    values near the float32 limit can come out infinite: a ``ModelOutputError`` then, as for the
    output itself."""
    out = processor.post_process_depth_estimation(_Outputs(depth.float().cpu()), target_sizes=[(h, w)])
    # the post-processing squeezes: a map 1 pixel tall or wide would lose that axis
    depth = out[0]["predicted_depth"].numpy().astype(np.float32).reshape(h, w)
    require_finite(depth, "the model's output, upsampled to the image")
    return depth


class _Outputs:
    """What ``post_process_depth_estimation`` reads from a model output."""

    def __init__(self, predicted_depth: torch.Tensor) -> None:
        self.predicted_depth = predicted_depth
