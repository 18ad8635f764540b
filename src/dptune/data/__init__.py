from dptune.data.datamodule import SegmentationDataModule
from dptune.data.dataset import SegmentationDataset
from dptune.data.hf_sources import HFSource
from dptune.data.images import read_image
from dptune.data.loaders import collate
from dptune.data.masks import read_mask
from dptune.data.sources import FolderSource, SyntheticSource

__all__ = [
    "FolderSource", "HFSource", "SegmentationDataModule", "SegmentationDataset", "SyntheticSource",
    "collate", "read_image", "read_mask",
]
