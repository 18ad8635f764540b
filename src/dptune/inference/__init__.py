"""Prediction with a trained model: ``windows`` (whole-image and sliding-window logits, test-time
augmentation; the tasks' sliding-window validation uses it too), ``loading`` (one path from a dptune
checkpoint or an exported directory to a model part, its image processor and ``Preprocessing``
spec), ``predictor`` (segmentation: ``from dptune.inference.predictor import Predictor``) and
``depth_predictor`` (depth: ``DepthPredictor``).

This file imports nothing: the tasks import ``windows`` without loading the predictors, which read
checkpoints through the tasks."""
