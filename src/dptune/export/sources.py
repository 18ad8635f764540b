"""What an export is made from: a dptune checkpoint or an exported directory (``load_source``)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dptune.errors import ConfigError
from dptune.preprocessing import Preprocessing


def is_depth(model: nn.Module) -> bool:
    return "DepthEstimation" in type(model).__name__


def load_source(src: str) -> dict:
    """What export needs from a checkpoint or an exported directory, for either task: model, image
    processor, metrics, task metadata (label set or depth mode) and how the metrics were measured."""
    if Path(src).is_dir():
        from transformers import AutoImageProcessor

        from dptune.models import load_exported
        from dptune.models.folders import check_export_files, json_object
        from dptune.models.source import is_joint_export

        if is_joint_export(src):
            raise ConfigError(f"{src}: a segmentation + depth export (segmentation/ and depth/); export again from "
                              f"its checkpoint, or export one part ({Path(src) / 'segmentation'})")
        check_export_files(src)  # each file read below, readable: one line naming a damaged one
        model = load_exported(src)
        card = Path(src) / "dptune.json"
        meta = json_object(card, "dptune's record of the export") if card.exists() else {}
        processor = AutoImageProcessor.from_pretrained(src)
        # one height x width, as every dptune loader reads it: an export it cannot prepare images for is refused here
        Preprocessing.from_processor(processor, source=str(Path(src) / "preprocessor_config.json"))
        out = {"model": model, "processor": processor, "metrics": meta.get("metrics", {}),
               "meta": meta, "evaluation": meta.get("evaluation", {})}
        if not is_depth(model):
            from dptune.inference.predictor import exported_labels

            if card.exists() and "labels" not in meta:
                raise ConfigError(f"{card}: no labels (the class names a segmentation export records)")
            out["labels"] = exported_labels(src, model.config.id2label)
        return out
    from dptune.tasks.checkpoints import load_module

    module = load_module(src)
    return {"model": module.model, "processor": module.image_processor(), "metrics": module.checkpoint_metrics,
            "meta": module.checkpoint_meta, "evaluation": module.checkpoint_evaluation,
            "labels": getattr(module, "label_set", None), "task": module.task}
