"""dptune: fine-tune Dense Prediction Transformers for semantic segmentation."""

from dptune.errors import DataError
from dptune.labels import IGNORE_INDEX, LabelSet

__all__ = ["IGNORE_INDEX", "DataError", "LabelSet"]
__version__ = "0.1.0"
