"""Segmentation prediction from a dptune checkpoint or an exported directory, for evaluate and
predict: every view (the whole image, its sliding windows, flips, turns and scales) prepared by
the model's image processor and ``Preprocessing`` spec."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dptune.inference.loading import exported_labels, load_export, load_part, placed
from dptune.inference.windows import FLIP_VIEWS, flip_views, predict_probs
from dptune.labels import LabelSet
from dptune.metrics import require_finite
from dptune.metrics.segmentation import class_map
from dptune.models import segment
from dptune.models.dpt_backbone import input_multiple
from dptune.models.forward import check_multiple
from dptune.preprocessing import Preprocessing, check_image

__all__ = ["Predictor", "exported_labels", "load_export"]


@dataclass
class Predictor:
    model: torch.nn.Module
    labels: LabelSet
    preprocessing: Preprocessing  # size (whole-image size, window size) and resample of every view
    device: torch.device
    processor: object = None  # the DPTImageProcessor: every view's rescale and normalisation, bit for bit
    graph: object = None  # an ONNX graph run instead of ``model`` (--backend onnx; see dptune.inference.onnx_runner)

    def __post_init__(self) -> None:
        if self.processor is None:
            self.processor = self.preprocessing.processor()

    @property
    def size(self) -> tuple[int, int]:
        return self.preprocessing.size

    @classmethod
    def load(cls, ref: str, device: str = "cpu", trust_remote_code: bool = False, backend: str = "torch") -> Predictor:
        """``ref``: a dptune ``.ckpt`` or a directory written by ``scripts/export.py``; of a
        segmentation + depth model, its segmentation part (see ``load_part``). ``backend``: ``torch``,
        or ``onnx`` / ``onnx-int8`` / ``onnx-fp16`` to run the export's graph (``logits`` output)."""
        from dptune.inference.onnx_runner import backend_graph

        graph = backend_graph(ref, backend, device, "logits")
        dev = torch.device(device)
        part = load_part(ref, "segmentation", trust_remote_code)
        return cls(placed(part.model, dev), part.labels, part.preprocessing, dev, part.processor, graph)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) images (sliding windows) -> logits of the main head, each image
        rescaled and normalised by the processor as it is (never resized nor padded)."""
        return self.normalized_logits(self.prepare(images, False))

    @torch.no_grad()
    def normalized_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:  # the size the torch path takes (segment checks it), checked before the graph
            check_multiple(pixel_values, input_multiple(self.model.config))
            logits = torch.from_numpy(self.graph(pixel_values)["logits"])
        else:
            logits = segment(self.model, pixel_values.to(self.device), with_aux=False)[0]
        require_finite(logits, "the model's output")  # NaN logits have an argmax: a mask, silently wrong
        return logits

    def prepare(self, images: torch.Tensor, whole: bool) -> torch.Tensor:
        """The model input of a uint8 (B, 3, H, W) batch: a whole-image view (``whole``) exactly as
        plain ``transformers`` prepares the image (resize to the processor's size for it, rescale,
        normalise, pad); a sliding window rescaled and normalised as it is (already the window
        size: a resize or a pad would move it off its place in the image)."""
        views = [np.ascontiguousarray(v.numpy()) for v in images.cpu()]
        kw = {} if whole else {"do_resize": False, "do_pad": False}
        return self.processor(images=views, return_tensors="pt", input_data_format="channels_first", **kw)["pixel_values"]

    def pixel_values(self, image: np.ndarray) -> torch.Tensor:
        """The processor's input for one uint8 HxWx3 image: what plain ``transformers`` computes.
        Channels are said, not guessed: ``transformers`` guesses channels first for an image 1 or
        3 pixels tall."""
        check_image(image)
        return self.processor(images=image, return_tensors="pt", input_data_format="channels_last")["pixel_values"]

    def predict(self, image: np.ndarray, mode: str = "whole", flip: bool | str = False,
                scales: tuple[float, ...] = (1.0,), stride: float = 2 / 3) -> tuple[np.ndarray, np.ndarray]:
        """(class indices HxW uint8, top-class probability HxW float32) for one uint8 HxWx3 RGB
        image (anything else is a ``ValueError``: see ``dptune.preprocessing.check_image``).

        A single-view ``whole`` prediction is what plain ``transformers`` computes: the exported
        image processor's input, logits upsampled to the image size, argmax of the logits.
        Test-time augmentation averages class probabilities over the views.
        """
        check_image(image)
        h, w = image.shape[:2]
        if mode == "whole" and tuple(scales) == (1.0,) and flip_views(flip) == FLIP_VIEWS["none"]:
            x = self.pixel_values(image)
            lg = torch.nn.functional.interpolate(self.normalized_logits(x).float(), size=(h, w), mode="bilinear",
                                                 align_corners=False)[0].cpu()
            require_finite(lg[None], "the model's output, upsampled to the image")  # logits at the float32 limit
            return class_map(lg, 0).numpy().astype(np.uint8), lg.softmax(0).max(0).values.numpy()
        probs = self.probs(image, mode, flip, scales, stride)
        conf, pred = probs.max(0)
        return pred.numpy().astype(np.uint8), conf.numpy()

    def probs(self, image: np.ndarray, mode: str = "whole", flip: bool | str = False,
              scales: tuple[float, ...] = (1.0,), stride: float = 2 / 3) -> torch.Tensor:
        """Class probabilities (C, H, W) for one uint8 HxWx3 RGB image at its own size, averaged
        over the views (the image, its flips / turns, each scale); every whole-image view the
        image at its scale prepared by the processor, then flipped or turned (one path for any
        ``scales``)."""
        check_image(image)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        strides = [max(1, round(s * stride)) for s in self.size]
        probs = predict_probs(self.normalized_logits, x, self.preprocessing, mode=mode, stride=strides, flip=flip,
                              scales=scales, prepare=self.prepare)[0].cpu()
        require_finite(probs[None], "the class probabilities from the model's output")  # its views resized, averaged
        return probs
