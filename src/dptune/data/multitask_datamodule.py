"""MultiTaskDataModule: segmentation and depth sources mixed into one training stream (a sample
carries a mask, a depth map or, from a source with both, both; what is missing is filled with
"no label": 255 in masks, 0 in depth), with a sampling ratio between the sources; each task
validates on its own data."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from dptune.data.base import default_workers, seed_worker
from dptune.data.datamodule import SegmentationDataModule
from dptune.data.depth_datamodule import DepthDataModule
from dptune.errors import ConfigError
from dptune.labels import IGNORE_INDEX


class JointTrainSet(Dataset):
    """Segmentation items followed by depth items, each completed with the other task's "no label"."""

    def __init__(self, seg: Dataset, depth: Dataset) -> None:
        self.seg, self.depth = seg, depth

    def __len__(self) -> int:
        return len(self.seg) + len(self.depth)

    def __getitem__(self, k: int) -> dict[str, Any]:
        if k < len(self.seg):
            item = dict(self.seg[k])
            item["depth"] = torch.zeros(item["mask"].shape, dtype=torch.float32)
        else:
            item = dict(self.depth[k - len(self.seg)])
            item["mask"] = torch.full(item["depth"].shape, IGNORE_INDEX, dtype=torch.uint8)
        return item


def source_weights(n_seg: int, n_depth: int, ratio: float) -> list[float]:
    """Per-sample draw weights so that a share ``ratio`` of the drawn samples is segmentation's."""
    return [ratio / n_seg] * n_seg + [(1 - ratio) / n_depth] * n_depth


def collate_joint(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Training crops share one size: stack images, masks and depth maps."""
    return {"image": torch.stack([it["image"] for it in items]), "mask": torch.stack([it["mask"] for it in items]),
            "depth": torch.stack([it["depth"] for it in items]), "index": torch.tensor([it["index"] for it in items])}


class MultiTaskDataModule(pl.LightningDataModule):
    def __init__(
        self,
        segmentation: dict[str, Any] | None = None,
        depth: dict[str, Any] | None = None,
        image_size: int = 224,
        ratio: float = 0.5,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int | None = None,
    ) -> None:
        """
        Args:
            segmentation: The segmentation source: ``SegmentationDataModule`` settings (root, labels,
                splits, cache, ...), e.g. CamVid's.
            depth: The depth source: ``DepthDataModule`` settings (root, splits, depth_scale, ...),
                e.g. 7-Scenes'.
            image_size: Training crop and evaluation size of both tasks (square for plain transformers).
            ratio: Share of training samples drawn from the segmentation source (the rest from the depth
                source); an epoch has as many samples as both sources together.
            batch_size: Training batch size per process (mixed sources).
            val_batch_size: Validation batch size (default: ``batch_size``).
            num_workers: Loader workers (default as for the single-task datamodules).
        """
        super().__init__()
        self.save_hyperparameters()
        if not (segmentation and depth):
            raise ConfigError("data.segmentation and data.depth are both needed (one source per task)")
        if not 0 < ratio < 1:
            raise ConfigError(f"data.ratio must be in (0, 1), got {ratio}")
        common = {"image_size": image_size, "batch_size": batch_size, "val_batch_size": val_batch_size,
                  "num_workers": num_workers}
        self.seg = SegmentationDataModule(**{**segmentation, **common, "crop_size": image_size})
        self.depth = DepthDataModule(**{**depth, **common, "crop_size": None})
        self.image_size, self.batch_size, self.ratio = image_size, batch_size, ratio
        self.num_workers = default_workers(num_workers)

    @property
    def labels_spec(self) -> dict[str, Any]:
        return self.seg.labels_spec

    def setup(self, stage: str | None = None) -> None:
        for dm in (self.seg, self.depth):
            dm.trainer = self.trainer
            dm.setup(stage)

    def train_dataloader(self) -> DataLoader:
        seg, depth = self.seg._dataset("train"), self.depth._dataset("train")
        data = JointTrainSet(seg, depth)
        weights = source_weights(len(seg), len(depth), self.ratio)
        generator = torch.Generator().manual_seed(torch.initial_seed() % 2**32)
        sampler = WeightedRandomSampler(weights, num_samples=len(data), replacement=True, generator=generator)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, drop_last=len(data) > self.batch_size,
                          num_workers=self.num_workers, collate_fn=collate_joint, worker_init_fn=seed_worker,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> list[DataLoader]:
        return [self.seg.val_dataloader(), self.depth.val_dataloader()]
