"""The loaders of every datamodule: seeds per process and worker (augmentations differ per rank),
the evaluation sampler that counts each sample once across processes, the batch (labels padded
with "no label"), and how many workers."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from dptune.labels import IGNORE_INDEX


def rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def augment_seed() -> int:
    """Per process (and per worker) seed for albumentations: torch's seed, offset by the rank so
    that processes of a multi-GPU run do not draw the same augmentations."""
    return (torch.initial_seed() + 1_000_003 * rank()) % 2**32


def stream_seed() -> int:
    """The shuffle seed of a training stream: the run's seed, the same on every rank. When the
    world size does not divide the shard count, ``datasets`` gives each rank every
    ``world_size``-th example of the stream, which splits it exactly only if all ranks shuffle alike."""
    return torch.initial_seed() % 2**32


def datasets_of(ds) -> list:
    """``ds`` and every dataset it is made of (``datasets``: a joint set, ``ConcatDataset``), depth first."""
    found = [ds]
    for child in getattr(ds, "datasets", None) or []:
        found.extend(datasets_of(child))
    return found


def seed_worker(worker_id: int) -> None:
    """Each loader worker reseeds the augmentations of every dataset it reads (a joint set's sources
    too), so that workers do not replay the main process's random stream; each dataset gets its own."""
    import cv2

    from dptune.data.transforms import seed_augmentations

    cv2.setNumThreads(0)  # OpenCV's own thread pool would oversubscribe the cores the workers share
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    for k, ds in enumerate(datasets_of(info.dataset)):
        transform = getattr(ds, "transform", None)
        if transform is not None:
            seed_augmentations(transform, (augment_seed() + 7919 * k) % 2**32)


class EvalDistributedSampler(DistributedSampler):
    """Shards evaluation data across processes without padding.

    ``DistributedSampler`` repeats samples to even out the shards, and a repeated sample would
    be counted twice in the confusion matrix. Here rank r takes samples r, r + W, r + 2W, ...;
    shards may differ in length by one, which evaluation (no gradient sync) does not mind.
    """

    def __init__(self, dataset, num_replicas: int, rank: int) -> None:
        # a DistributedSampler subclass, so that Lightning keeps it instead of installing its own
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.n = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))



# what a batch's labels are padded with where samples differ in size: "no label" of each kind
LABEL_PADDING = (("mask", IGNORE_INDEX), ("depth", 0.0))


def _stack_padded(tensors: list[torch.Tensor], fill: float) -> torch.Tensor:
    """Stack tensors of one rank; where their sizes differ, each at the top left of a ``fill`` tensor
    of the largest size."""
    if len({tuple(t.shape) for t in tensors}) == 1:
        return torch.stack(tensors)
    shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].ndim)]
    out = tensors[0].new_full((len(tensors), *shape), fill)
    for b, t in enumerate(tensors):
        out[b][tuple(slice(0, n) for n in t.shape)] = t
    return out


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The batch of every datamodule: images, and whichever labels the items carry (``mask``,
    ``depth``), stacked; where sizes differ (evaluation at native label size) padded at the bottom
    and right, images with 0 and labels with "no label" (``LABEL_PADDING``: 255 in masks, 0 in
    depth). ``sizes`` keeps each sample's label size (h, w) so that predictions are resized per sample."""
    labels = [(key, fill) for key, fill in LABEL_PADDING if key in items[0]]
    batch = {"image": _stack_padded([it["image"] for it in items], 0)}
    for key, fill in labels:
        values = [it[key] for it in items]
        if key == "depth":  # metres in float32, whatever each item holds (no item's dtype rounds another's)
            values = [v.float() for v in values]
        batch[key] = _stack_padded(values, fill)
    batch["index"] = torch.tensor([it["index"] for it in items])
    batch["sizes"] = [tuple(it[labels[0][0]].shape) for it in items]
    return batch


def default_workers(num_workers: int | None) -> int:
    """Loader workers: none on machines with 2 cores or fewer (a worker would compete with the
    model for them), else half the cores, at most 8."""
    if num_workers is not None:
        return num_workers
    from dptune.cores import usable_cores

    cores = usable_cores()
    return 0 if cores <= 2 else min(8, cores // 2)


def drops_last_batch(share: int, batch_size: int) -> bool:
    """Whether a training loader drops its last partial batch: where a process's share of the split
    holds a whole batch (4 images on 2 processes in batches of 3 train on 2 each, not on none)."""
    return share > batch_size


def make_loader(ds, stage: str, batch_size: int, trainer, num_workers: int, pin_memory: bool,
                persistent_workers: bool, collate_fn: Callable, streaming: bool = False,
                sampler: torch.utils.data.Sampler | None = None) -> DataLoader:
    """The loader of every datamodule: a training loader (shuffled unless a ``sampler`` draws, last
    partial batch dropped) or an evaluation loader (each sample on exactly one process); workers
    reseed the augmentations (``seed_worker``)."""
    world = trainer.world_size if trainer is not None else 1
    if sampler is None and not streaming and stage != "train" and world > 1:
        sampler = EvalDistributedSampler(ds, world, trainer.global_rank)
    # a partial batch is dropped only where this process has a whole one (its share of the split:
    # 4 images on 2 processes in batches of 3 train on 2 each, not on none)
    whole = streaming or (stage == "train" and drops_last_batch(-(-len(ds) // world), batch_size))
    return DataLoader(
        ds, batch_size=batch_size, shuffle=stage == "train" and not streaming and sampler is None, sampler=sampler,
        drop_last=stage == "train" and whole, num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=persistent_workers, collate_fn=collate_fn,
        worker_init_fn=seed_worker,
    )
