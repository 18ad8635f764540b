"""MultiTaskDataModule: segmentation and depth sources mixed into one training stream.

A sample carries a mask, a depth map or, from a depth source that names masks too, both; what is
missing is filled with "no label" (255 in masks, 0 in depth). Several segmentation sources each
keep their own label set, mapped by class name into the model's one label set. Sources are drawn
by ``weight`` (default: every sample once per epoch); each source validates on its own data."""

from __future__ import annotations

import bisect
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from dptune.data.base import ValidationSource, asks_for_scores, one_process_stage
from dptune.data.datamodule import SegmentationDataModule
from dptune.data.depth_datamodule import DepthDataModule
from dptune.data.loaders import collate, default_workers, make_loader, rank
from dptune.data.order import Drawn, OrderState
from dptune.errors import ConfigError, DataError
from dptune.labels import IGNORE_INDEX, LabelSet, default_palette

Kind = Literal["segmentation", "depth", "both"]

log = logging.getLogger(__name__)


@dataclass
class MixSource:
    name: str
    kind: Kind
    dm: SegmentationDataModule | DepthDataModule
    weight: float | None

    @property
    def has_masks(self) -> bool:
        return self.kind != "depth"

    @property
    def has_depth(self) -> bool:
        return self.kind != "segmentation"


class JointTrainSet(Dataset):
    """The sources' training items one after the other, each completed with "no label" for the task
    its source does not label."""

    def __init__(self, datasets: list[Dataset]) -> None:
        self.datasets = datasets
        self.starts = [0]
        for ds in datasets:
            self.starts.append(self.starts[-1] + len(ds))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, k: int) -> dict[str, Any]:
        s = bisect.bisect_right(self.starts, k) - 1
        item = dict(self.datasets[s][k.moved(k - self.starts[s]) if isinstance(k, Drawn) else k - self.starts[s]])
        shape = (item["mask"] if "mask" in item else item["depth"]).shape
        item.setdefault("depth", torch.zeros(shape, dtype=torch.float32))
        item.setdefault("mask", torch.full(shape, IGNORE_INDEX, dtype=torch.uint8))
        return item


def source_weights(sizes: list[int], weights: list[float]) -> list[float]:
    """Per-sample draw weights so that source ``j`` gives a share ``weights[j] / sum(weights)`` of the
    drawn samples, spread evenly over its own samples."""
    total = sum(weights)
    return [w / total / n for n, w in zip(sizes, weights, strict=True) for _ in range(n)]


def joint_label_set(label_sets: list[LabelSet], names: list[str] | None) -> LabelSet:
    """The model's label set: ``names`` when given, else every source's classes by name (case-insensitive,
    first spelling and colour kept) in source order."""
    if names is None:
        names, seen = [], set()
        for ls in label_sets:
            for n in ls.names:
                if n.lower() not in seen:
                    seen.add(n.lower())
                    names.append(n)
    colors: dict[str, list[int]] = {}
    for ls in label_sets:
        for n, c in zip(ls.names, ls.colors, strict=True):
            if n.lower() not in colors and c not in colors.values():
                colors[n.lower()] = c
    spare = iter(c for c in default_palette(len(names) + len(colors)) if c not in colors.values())
    return LabelSet(names=list(names), colors=[colors.get(n.lower()) or next(spare) for n in names],
                    source="data.labels")


def check_every_class_labelled(label_set: LabelSet, sources: list[MixSource]) -> None:
    """Stop when a class of the model's list is marked by no source's masks (named in ``data.labels``
    but in no source's labels, or in a label file that maps no mask value to it). Such a class is
    only ever trained as "not this class": it can never be learned, yet the exported model would
    offer it. (A class that a source can mark but whose pixels happen to be absent is the data's
    business: the per-source check on the training masks warns about it.)"""
    labelled = set()
    for s in sources:
        ls = s.dm.label_set
        labelled.update(range(ls.num_classes) if ls.annotated is None else ls.annotated)
    never = [n for i, n in enumerate(label_set.names) if i not in labelled]
    if never:
        raise ConfigError(f"data.labels: classes {never} are labelled by no source "
                          f"({', '.join(s.name for s in sources)}), so they can never be learned; remove them "
                          "from data.labels, or add a source (or a map entry in a source's label file) that labels them")


def class_list_line(label_set: LabelSet, sources: list[MixSource]) -> str:
    """The model's classes, index and name, and which source labels which (one log line)."""
    classes = ", ".join(f"{i} {n}" for i, n in enumerate(label_set.names))
    counts = [label_set.num_classes if s.dm.label_set.annotated is None else len(s.dm.label_set.annotated)
              for s in sources]
    labelled = "; ".join(f"{s.name}: {n}" for s, n in zip(sources, counts, strict=True))
    return f"model classes ({label_set.num_classes}): {classes} (classes each source labels: {labelled})"


class MultiTaskDataModule(OrderState, pl.LightningDataModule):
    def __init__(
        self,
        segmentation: dict[str, Any] | list[dict[str, Any]] | None = None,
        depth: dict[str, Any] | list[dict[str, Any]] | None = None,
        labels: list[str] | None = None,
        image_size: int = 224,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int | None = None,
    ) -> None:
        """
        Args:
            segmentation: A segmentation source, or a list of them: ``SegmentationDataModule`` settings
                (root, labels, splits, cache, ...), e.g. CamVid's, plus optional ``name`` (default: the
                root folder's name; names the source's validation metrics) and ``weight``.
            depth: A depth source, or a list: ``DepthDataModule`` settings (root, splits, depth_scale,
                ...) plus ``name`` and ``weight``. Give it ``labels`` and a ``masks`` template in its
                splits when its samples carry masks too: they then train both tasks.
            labels: The model's class names. Default: every source's classes, matched by name
                (case-insensitive), in source order. Each source's own label set is mapped into it by
                name; a class a source lacks is simply never labelled in that source's masks, but a
                class that no source labels stops the run (it could never be learned). The merged
                list is logged at setup.
            image_size: Training crop and evaluation size of both tasks (square for plain transformers).
            batch_size: Training batch size per process (mixed sources).
            val_batch_size: Validation batch size (default: ``batch_size``).
            num_workers: Loader workers (default as for the single-task datamodules).

        Sampling: without weights every training sample is drawn once per epoch (shuffled); with a
        ``weight`` on every source, source ``j`` gives ``weight_j / sum(weights)`` of the drawn samples
        (drawn with replacement; an epoch has as many samples as all sources together).
        """
        super().__init__()
        self.save_hyperparameters()
        common = {"image_size": image_size, "batch_size": batch_size, "val_batch_size": val_batch_size,
                  "num_workers": num_workers}
        self.sources: list[MixSource] = []
        for task, specs in (("segmentation", segmentation), ("depth", depth)):
            for j, spec in enumerate(specs if isinstance(specs, list) else [specs] if specs else []):
                self.sources.append(self._source(task, j, dict(spec), common))
        if not any(s.has_masks for s in self.sources) or not any(s.has_depth for s in self.sources):
            raise ConfigError("data.segmentation and data.depth: each task needs a source (a depth source with "
                              "labels and masks counts for both)")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data: source names must differ, got {names} (set name: in each source)")
        given = [s.weight is not None for s in self.sources]
        if any(given) and not all(given):
            raise ConfigError("data: give a weight to every source or to none (none: every sample once per epoch)")
        self.label_set = joint_label_set([s.dm.label_set for s in self.sources if s.has_masks], labels)
        for s in self.sources:
            if s.has_masks:
                s.dm.label_set = s.dm.label_set.retarget(self.label_set.names, self.label_set.colors)
        check_every_class_labelled(self.label_set, [s for s in self.sources if s.has_masks])
        self.image_size, self.batch_size = image_size, batch_size
        self.num_workers = default_workers(num_workers)
        self._logged_classes = False

    @staticmethod
    def _source(task: str, j: int, spec: dict[str, Any], common: dict[str, Any]) -> MixSource:
        name = spec.pop("name", None) or os.path.basename(os.path.normpath(spec.get("root", "."))) or f"{task}{j}"
        weight = spec.pop("weight", None)
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                                   or not 0 < weight < math.inf):
            raise ConfigError(f"data.{task} source {name!r}: weight must be a finite number > 0, got {weight!r}")
        # what validation of the joint task does not do yet stops here, rather than being ignored
        if task == "segmentation" and spec.get("val_mode", "resize") == "slide":
            raise ConfigError(f"data.segmentation source {name!r}: val_mode 'slide' is not supported in "
                              "segmentation + depth training (it validates whole images resized to image_size); "
                              "score the exported segmentation part with scripts/evaluate.py --mode slide")
        if task == "segmentation" and spec.get("val_mode", "resize") != "resize":
            raise ConfigError(f"data.segmentation source {name!r}: val_mode must be resize, got {spec['val_mode']!r}")
        if task == "depth" and spec.get("eval_crop", "none") not in ("none", "eigen", "garg"):
            raise ConfigError(f"data.depth source {name!r}: eval_crop must be none, eigen or garg, got "
                              f"{spec['eval_crop']!r}")
        if task == "depth" and spec.get("eval_crop", "none") != "none":
            raise ConfigError(f"data.depth source {name!r}: eval_crop {spec['eval_crop']!r} is not supported in "
                              "segmentation + depth training (it scores every valid pixel); score the exported "
                              f"depth part with scripts/evaluate.py --depth TEMPLATE --eval-crop {spec['eval_crop']}")
        where = f"data.{task} source {name!r}: data.{task}"  # its messages name the source
        try:
            if task == "segmentation":
                dm = SegmentationDataModule(**{**spec, **common, "crop_size": common["image_size"]})
            else:
                dm = DepthDataModule(**{**spec, **common, "crop_size": None})
        except (ConfigError, DataError) as e:  # a source's own setting, said as data.<setting> by its datamodule
            said = str(e)
            if said.startswith("data.") and type(e) in (ConfigError, DataError):
                raise type(e)(f"{where}{said[len('data'):]}") from None
            raise
        dm.config_path = where
        return MixSource(name, "segmentation" if task == "segmentation" else "both" if dm.label_set is not None
                         else "depth", dm, weight)

    @property
    def labels_spec(self) -> dict[str, Any]:
        return self.label_set.to_dict()

    @property
    def val_sources(self) -> list[MixSource]:
        """The sources with a validation split, in the order of ``val_dataloader``."""
        return [s for s in self.sources if "val" in s.dm.splits]

    def validation_sources(self) -> list[ValidationSource]:
        """What the task's per-source metrics are declared from: each validation loader's source
        name and labels, in the order of ``val_dataloader``."""
        return [ValidationSource(s.name, s.has_masks, s.has_depth) for s in self.val_sources]

    def check_model_range(self, min_depth: float, max_depth: float | None) -> None:
        """Each depth source's checked splits against the range the model trains and scores on."""
        for s in self.sources:
            if s.has_depth:
                s.dm.check_model_range(min_depth, max_depth)

    def prepare_data(self) -> None:
        """As ``SplitDataModule.prepare_data``: in a run of one process, before Lightning starts the
        run's loggers, a stage that scores the validation splits needs a source with one, and the
        data is checked (``setup``)."""
        stage = one_process_stage(self.trainer)
        if stage is None:
            return
        if stage in ("fit", "validate") and asks_for_scores(self.trainer, stage) and not self.val_sources:
            raise DataError(f"data: no source has a 'val' split; {stage} scores each task on its sources' validation "
                            "splits (give at least one source a val split)")
        self.setup(stage)
        self.checked_stage = stage  # as SplitDataModule.prepare_data

    def setup(self, stage: str | None = None) -> None:
        for s in self.sources:
            s.dm.trainer = self.trainer
            s.dm.setup(stage)
        if not self._logged_classes and rank() == 0:
            log.info("%s", class_list_line(self.label_set, [s for s in self.sources if s.has_masks]))
            self._logged_classes = True

    def train_length(self) -> int | None:
        datasets = [s.dm.dataset("train") for s in self.sources]
        return None if any(isinstance(d, IterableDataset) for d in datasets) else len(JointTrainSet(datasets))

    def train_dataloader(self) -> DataLoader:
        datasets = [s.dm.dataset("train") for s in self.sources]
        data = JointTrainSet(datasets)
        weights = None
        if self.sources[0].weight is not None:
            weights = torch.tensor(source_weights([len(d) for d in datasets], [s.weight for s in self.sources]))
        sampler = self.train_order(data, self.batch_size, weights)
        return make_loader(data, "train", self.batch_size, self.trainer, self.num_workers,
                           self.sources[0].dm.pin_memory, self.num_workers > 0, collate, sampler=sampler)

    def val_dataloader(self) -> list[DataLoader]:
        return [s.dm.val_dataloader() for s in self.val_sources]
