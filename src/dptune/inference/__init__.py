"""Prediction with a trained model: ``windows`` (whole-image and sliding-window logits, test-time
augmentation), ``loading`` (one path from a dptune checkpoint or an exported directory to a model
part, its image processor and ``Preprocessing`` spec), ``predictor`` (segmentation) and
``depth_predictor`` (depth).

``from dptune.inference import Predictor, DepthPredictor`` works; the predictors are imported on
first use, so the training code that needs only ``windows`` does not load them."""

from __future__ import annotations

from typing import Any

__all__ = ["DepthPredictor", "Predictor"]


def __getattr__(name: str) -> Any:
    if name == "Predictor":
        from dptune.inference.predictor import Predictor

        return Predictor
    if name == "DepthPredictor":
        from dptune.inference.depth_predictor import DepthPredictor

        return DepthPredictor
    raise AttributeError(f"module 'dptune.inference' has no attribute {name!r}")
