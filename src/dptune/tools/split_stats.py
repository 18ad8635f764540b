"""What ``dptune inspect`` counts in a split and how it prints it: image sizes, per-class pixels and
the images each class appears in, class weights from them; for depth, valid pixels and their range
(against the model's), with the samples that could not be read (``dptune.tools.inspect``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dptune.errors import ConfigError, DataError
from dptune.labels import IGNORE_INDEX, LabelSet

MAX_MM = 1_000_000  # the median's histogram stops at 1 km; min and max are exact


@dataclass
class SplitStats:
    name: str
    images: int = 0
    sizes: list[tuple[int, int]] = field(default_factory=list)
    pixels: np.ndarray | None = None  # per class, plus ignore at index C
    present: np.ndarray | None = None  # pixels of the images in which each class appears
    problems: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # the label set's classes


@dataclass
class DepthStats:
    name: str
    samples: int = 0
    sizes: list[tuple[int, int]] = field(default_factory=list)
    pixels: int = 0
    valid: int = 0
    empty: int = 0  # maps with no valid pixel
    lo: float = float("inf")
    hi: float = 0.0
    mm: np.ndarray = field(default_factory=lambda: np.zeros(MAX_MM + 1, np.int64))  # valid depth, 1 mm bins
    problems: list[str] = field(default_factory=list)
    # the model's (min_depth, max_depth) from the config: depth outside it counts in no loss or metric
    depth_range: tuple[float, float | None] | None = None
    below: int = 0  # valid pixels under min_depth
    above: int = 0  # valid pixels over max_depth

    def median(self) -> float:
        """Median valid depth in metres, to the millimetre."""
        return float(np.searchsorted(np.cumsum(self.mm), (self.valid - 1) // 2 + 1)) / 1000


def class_counts(enc: np.ndarray, labels: LabelSet) -> np.ndarray:
    """Per-class pixel counts of an encoded mask (ignore counted in the last slot)."""
    counts = np.bincount(enc.ravel(), minlength=256)
    return np.append(counts[: labels.num_classes], counts[IGNORE_INDEX])


def mask_counts(source: Any, labels: LabelSet, i: int) -> tuple[tuple[int, int], np.ndarray]:
    """Sample ``i``'s image size and the per-class pixel counts of its encoded mask (ignore counted in
    the last slot); a mask of another size than its image is a ``DataError``, as in training."""
    from dptune.data.dataset import encode_mask, read_sample

    _, hw, raw, name = read_sample(source, i, decode_image=False)  # a folder: the image's header only
    return hw, class_counts(encode_mask(raw, name, labels, hw), labels)


def scan(stage: str, n: int, one: Callable[[int], Any], workers: int = 2) -> Iterator[Any]:
    """``one(i)`` of every sample, or the message of the DataError it raised, with a progress bar."""

    def safe(i: int) -> Any:
        try:
            return one(i)
        except DataError as e:
            return str(e)

    with ThreadPoolExecutor(workers) as pool:
        yield from tqdm(pool.map(safe, range(n)), total=n, desc=stage, leave=False, disable=None)  # terminals only


def new_split_stats(stage: str, images: int, labels: LabelSet) -> SplitStats:
    c = labels.num_classes
    return SplitStats(stage, images=images, pixels=np.zeros(c + 1, np.int64), present=np.zeros(c, np.int64),
                      names=list(labels.names))


def add_counts(stats: SplitStats, counts: np.ndarray) -> None:
    stats.pixels += counts
    stats.present += np.where(counts[:-1] > 0, counts.sum(), 0)


def inspect_split(stage: str, source: Any, labels: LabelSet, workers: int = 2) -> SplitStats:
    stats = new_split_stats(stage, len(source), labels)
    for out in scan(stage, len(source), lambda i: mask_counts(source, labels, i), workers):
        if isinstance(out, str):
            stats.problems.append(out)
            continue
        stats.sizes.append(out[0])
        add_counts(stats, out[1])
    return stats


def depth_sample(ds: Any, i: int) -> tuple[tuple[int, int], np.ndarray, np.ndarray | None]:
    """(image size, valid depths in metres, encoded mask or None) of one sample, read by the dataset."""
    image, depth, *mask = ds.load(i)
    return image.shape[:2], depth[depth > 0], (mask[0] if mask else None)


def add_depth(stats: DepthStats, size: tuple[int, int], valid: np.ndarray) -> None:
    stats.sizes.append(size)
    stats.pixels += size[0] * size[1]
    stats.valid += valid.size
    stats.empty += valid.size == 0
    if valid.size:
        stats.lo, stats.hi = min(stats.lo, float(valid.min())), max(stats.hi, float(valid.max()))
        if stats.depth_range is not None:  # as dptune.metrics.depth.valid_depth draws the line
            lo, hi = stats.depth_range
            stats.below += int((valid < lo).sum())
            stats.above += int((valid > hi).sum()) if hi else 0
        mm = np.bincount(np.minimum(np.round(valid.astype(np.float64) * 1000), MAX_MM).astype(np.int64))
        stats.mm[: mm.size] += mm


def inspect_depth_split(stage: str, ds: Any, workers: int = 2,
                        depth_range: tuple[float, float | None] | None = None) -> tuple[DepthStats, SplitStats | None]:
    """Depth facts of a split (with ``depth_range``, the model's: how much of it lies outside) and,
    when its samples carry masks too, their class counts."""
    stats = DepthStats(stage, samples=len(ds), depth_range=depth_range)
    classes = None if ds.labels is None else new_split_stats(stage, len(ds), ds.labels)
    for out in scan(stage, len(ds), lambda i: depth_sample(ds, i), workers):
        if isinstance(out, str):
            stats.problems.append(out)
            continue
        add_depth(stats, out[0], out[1])
        if classes is not None:
            classes.sizes.append(out[0])
            add_counts(classes, class_counts(out[2], ds.labels))
    return stats, classes


def class_weights(stats: SplitStats, mode: str) -> list[float]:
    """``inverse``: 1/frequency normalised to mean 1; ``median``: median frequency balancing
    (Eigen & Fergus), freq(c) = pixels of c / pixels of the images where c appears."""
    c = len(stats.present)
    pix = stats.pixels[:c].astype(np.float64)
    if mode == "inverse":
        freq = pix / max(pix.sum(), 1)
        w = np.where(freq > 0, 1.0 / np.maximum(freq, 1e-12), 0.0)
        w = w / w[w > 0].mean()
    elif mode == "median":
        freq = np.where(stats.present > 0, pix / np.maximum(stats.present, 1), 0.0)
        med = np.median(freq[freq > 0])
        w = np.where(freq > 0, med / np.maximum(freq, 1e-12), 0.0)
    else:
        raise ConfigError(f"--class-weights must be inverse or median, got {mode!r}")
    return [round(float(x), 4) for x in w]


def size_line(sizes: list[tuple[int, int]]) -> list[str]:
    if not sizes:
        return []
    hs, ws = np.array([s[0] for s in sizes]), np.array([s[1] for s in sizes])
    return [f"   size (w x h): min {ws.min()}x{hs.min()}  median {int(np.median(ws))}x{int(np.median(hs))}"
            f"  max {ws.max()}x{hs.max()}"]


def class_table(stats: SplitStats, labels: LabelSet) -> list[str]:
    total = max(int(stats.pixels.sum()), 1)
    lines = [f"   ignored pixels: {stats.pixels[-1] / total:.4f}", f"   {'class':<20} {'pixels':>12} {'frequency':>10}"]
    labelled = max(int(stats.pixels[:-1].sum()), 1)
    for name, n in zip(labels.names, stats.pixels[:-1], strict=True):
        lines.append(f"   {name:<20} {int(n):>12d} {n / labelled:>10.4f}")
    return lines


def problem_lines(problems: list[str]) -> list[str]:
    lines = [f"   bad: {p}" for p in problems[:20]]
    return lines + ([f"   ... and {len(problems) - 20} more"] if len(problems) > 20 else [])


def format_report(stats: SplitStats, labels: LabelSet) -> str:
    lines = [f"== {stats.name}: {stats.images} images, {len(stats.problems)} with problems"]
    lines += size_line(stats.sizes) + class_table(stats, labels) + problem_lines(stats.problems)
    return "\n".join(lines)


def format_depth_report(stats: DepthStats, classes: SplitStats | None = None, labels: LabelSet | None = None) -> str:
    lines = [f"== {stats.name}: {stats.samples} samples, {len(stats.problems)} with problems"]
    lines += size_line(stats.sizes)
    lines.append(f"   valid depth pixels: {stats.valid / max(stats.pixels, 1):.4f} of {stats.pixels}"
                 f" ({stats.empty} maps with none)")
    if stats.valid:
        lines.append(f"   valid depth (m): min {stats.lo:.3f}  median {stats.median():.3f}  max {stats.hi:.3f}")
    if stats.valid and stats.depth_range is not None:
        lo, hi = stats.depth_range
        inside = stats.valid - stats.below - stats.above
        lines.append(f"   in the model's range [{lo:g}, {f'{hi:g}' if hi else 'no maximum'}] m (model.min_depth / "
                     f"max_depth; losses and metrics use only these): {inside / stats.valid:.4f} of the valid pixels"
                     f" ({stats.below} below, {stats.above} above)")
    if classes is not None and labels is not None:
        lines += class_table(classes, labels)
    return "\n".join(lines + problem_lines(stats.problems))
