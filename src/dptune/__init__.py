"""dptune: fine-tune Dense Prediction Transformers for semantic segmentation and depth."""

from dptune.errors import DataError

__all__ = ["IGNORE_INDEX", "TASKS", "DataError", "LabelSet"]
__version__ = "0.1.0"

# what a run trains, a checkpoint holds and a config names (``task:``)
TASKS = ("segmentation", "depth", "multitask")


def __getattr__(name: str):
    # imported on first use: ``import dptune`` (every entry point's first step, before its Ctrl-C
    # handling is in place) stays free of numpy and yaml
    if name in ("IGNORE_INDEX", "LabelSet"):
        from dptune import labels

        return getattr(labels, name)
    raise AttributeError(f"module 'dptune' has no attribute {name!r}")
