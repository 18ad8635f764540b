"""Hugging Face ``datasets`` streaming (``hf: {streaming: true}``): data larger than local disk.

Each process reads its own part of the stream (``datasets.distributed.split_dataset_by_node``:
whole shards per rank when the shard count divides evenly, else every ``world_size``-th
example), and ``datasets`` splits a rank's shards across its loader workers. A training stream
is shuffled through a buffer, reshuffled each pass and repeats, so every rank always has a next
batch and the run length is ``trainer.max_steps``. An evaluation stream is read once: every
example lands on exactly one rank, so summed confusion matrices count each once.

A stream cannot be checked before training: a bad example stops the run with one line naming
it, or with ``data.on_bad_sample skip`` is skipped with a warning that names it and a count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset

from dptune.data.dataset import encode_sample, make_item
from dptune.data.hf_sources import array_dtypes, decode_row, open_hf_split, undecoded_masks
from dptune.errors import DataError
from dptune.labels import LabelSet

log = logging.getLogger(__name__)


def open_stream(dataset: str, split: str, config_name: str | None = None, num_shards: int = 8):
    """A ``datasets.IterableDataset`` (see ``open_hf_split``)."""
    return open_hf_split(dataset, split, config_name, streaming=True, num_shards=num_shards)


def shard_for_rank(stream, rank: int, world_size: int):
    """This process's part of the stream (the whole stream in a single-process run)."""
    if world_size <= 1:
        return stream
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(stream, rank=rank, world_size=world_size)


class StreamingSegmentation(IterableDataset):
    """Items as ``SegmentationDataset`` gives them, from a stream (see the module docstring)."""

    def __init__(
        self,
        stream,
        labels: LabelSet,
        label: str,
        columns: tuple[str, str] = ("image", "label"),
        rgb_masks: bool = False,
        transform: Callable[..., dict[str, Any]] | None = None,
        image_size: tuple[int, int] | None = None,
        train: bool = False,
        on_bad_sample: str = "error",
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.stream = shard_for_rank(undecoded_masks(stream, columns[1]), rank, world_size)
        self.labels, self.label, self.columns, self.rgb_masks = labels, label, columns, rgb_masks
        self.transform, self.image_size, self.train = transform, image_size, train
        self.on_bad_sample, self.shuffle_buffer, self.seed, self.rank = on_bad_sample, shuffle_buffer, seed, rank
        self.world_size = world_size
        self.skipped = 0
        self.dtypes = array_dtypes(getattr(stream, "features", None))  # a hub stream may not know its features

    def _item(self, row: dict[str, Any], name: str, index: int) -> dict[str, Any]:
        image, raw, _ = decode_row(row, name, *self.columns, self.rgb_masks, self.dtypes)
        return make_item(*encode_sample(image, raw, name, self.labels), index, self.transform, self.image_size)

    def passes(self) -> Iterator[Any]:
        """The stream once (evaluation) or reshuffled pass after pass (training)."""
        if not self.train:
            yield self.stream
            return
        epoch = 0
        shuffled = self.stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        while True:
            shuffled.set_epoch(epoch)
            yield shuffled
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        where = f"{self.label} rank {self.rank}" + (f" worker {info.id}" if info else "")
        for p, part in enumerate(self.passes()):
            seen = good = 0
            for k, row in enumerate(part):
                seen += 1
                # a training stream is reshuffled each pass: its examples are named by pass and place in it
                name = f"{where} pass {p + 1} example {k} (shuffled order)" if self.train else f"{where} example {k}"
                try:
                    item = self._item(row, name, k)
                except DataError as e:
                    if self.on_bad_sample != "skip":
                        raise
                    self.skipped += 1
                    log.warning("skipping %s (%d skipped so far%s)", e, self.skipped,
                                "; a bad example is skipped again on each pass" if self.train else "")
                    continue
                good += 1
                yield item
            if seen == 0:
                if self.train and info is None:
                    raise DataError(f"{where}: the stream is empty")
                return  # a worker with no shard of its own (more workers than shards)
            if self.train and good == 0:  # every pass would skip them all again: it looped for ever
                part = info is not None or self.world_size > 1  # this worker's / process's shards of the stream
                raise DataError(f"{where}: every one of the {seen} examples of a pass {'of its shards ' if part else ''}"
                                "was bad and skipped; " + ("it has nothing to train on while the others wait (other "
                                "shards may have data: fix the bad examples, or change data.hf.num_shards or "
                                "data.num_workers so that each part gets some good ones)" if part else
                                "nothing to train on"))
