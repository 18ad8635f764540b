"""Look at a dataset before training on it: sizes, class frequencies, bad masks, class weights;
for depth, the share of valid depth pixels and the valid depth range in metres.

    python scripts/inspect_data.py configs/camvid.yaml --root ../shared/data/camvid
    python scripts/inspect_data.py configs/camvid.yaml --class-weights median --out weights.yaml
    python train.py fit --config configs/camvid.yaml --config weights.yaml
    python scripts/inspect_data.py configs/depth/7scenes.yaml --root ../shared/data/7scenes-kitchen
    python scripts/inspect_data.py configs/multitask/camvid-7scenes.yaml

Reads the ``data:`` section of a train.py config of any task (no train.py needed), through the
task's own datamodule: a multitask config gets each source's report (classes for segmentation
sources, depth for depth sources, both for depth sources with masks). Class weights are for
segmentation configs only. Exit status: 0 clean, 1 some samples are bad, 2 an error.

Images are measured upright (their EXIF orientation applied, as training reads them); ``*.jpg``
takes ``.JPG`` too (``.jpeg`` files beside are counted in a warning). ``--out`` may not be the config
nor a file it names (its label file, ...) nor lie in a folder of the data's images or masks
(refused in one line before the scan), and replaces an existing file only when it is inspect's own
weights fragment, or with ``--overwrite``; it replaces the directory entry (a link there is
replaced, never written through).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from dptune.errors import ConfigError, DataError
from dptune.labels import IGNORE_INDEX, LabelSet

TASKS = ("segmentation", "depth", "multitask")
KINDS = {"segmentation": "segmentation", "depth": "depth", "both": "depth + segmentation"}  # of a multitask source
BUILDS = {"train": "fit", "val": "validate", "test": "test"}  # the Lightning stage that builds each split
MAX_MM = 1_000_000  # the median's histogram stops at 1 km; min and max are exact


@dataclass
class SplitStats:
    name: str
    images: int = 0
    sizes: list[tuple[int, int]] = field(default_factory=list)
    pixels: np.ndarray | None = None  # per class, plus ignore at index C
    present: np.ndarray | None = None  # pixels of the images in which each class appears
    problems: list[str] = field(default_factory=list)


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
    return SplitStats(stage, images=images, pixels=np.zeros(c + 1, np.int64), present=np.zeros(c, np.int64))


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


def segmentation_sources(dm: Any, stages: list[str]) -> dict[str, Any]:
    """The source of each split of a SegmentationDataModule that ``stages`` names."""
    from dptune.data.sources import build_source

    return {stage: build_source(dm.source_kind, dict(dm.splits[stage]), dm.root, dm.label_set.mask_format == "rgb",
                                stage, dm.hf) for stage in stages if stage in dm.splits}


def report_segmentation(dm: Any, stages: list[str], sources: dict[str, Any] | None = None) -> dict[str, SplitStats]:
    """Class statistics of each split of a SegmentationDataModule, printed as they come."""
    results = {}
    for stage, src in (sources if sources is not None else segmentation_sources(dm, stages)).items():
        results[stage] = inspect_split(stage, src, dm.label_set)
        print(format_report(results[stage], dm.label_set))
    return results


def report_depth(dm: Any, stages: list[str], depth_range: tuple[float, float | None] | None = None) -> list[list[str]]:
    """Depth statistics (and class counts of samples that carry masks) of each split of a
    DepthDataModule, read by its own datasets; the problems of each split."""
    problems = []
    for stage in stages:
        if stage in dm.splits:
            dm.setup(BUILDS[stage])
            stats, classes = inspect_depth_split(stage, dm.datasets[stage], depth_range=depth_range)
            print(format_depth_report(stats, classes, dm.label_set))
            problems.append(stats.problems)
    return problems


def quiet(spec: dict[str, Any]) -> dict[str, Any]:
    """A datamodule's settings for inspection: no pre-flight check, no cache (this reads every file once)."""
    return {**spec, "check": False, "cache": False}


def inspect_config(task: str, data: dict[str, Any], stages: list[str],
                   check_out: Callable[[list[str]], None] | None = None,
                   depth_range: tuple[float, float | None] | None = None) -> tuple[dict[str, SplitStats], bool]:
    """Print the report of a config's data; (segmentation results by split, whether any sample is bad).
    ``check_out`` (segmentation) sees the data's files before any is read; ``depth_range``: the
    model's (min_depth, max_depth), reported against the depth maps."""
    if task == "segmentation":
        from dptune.data.datamodule import SegmentationDataModule

        dm = SegmentationDataModule(**quiet(data), num_workers=0)
        sources = segmentation_sources(dm, stages)
        if check_out is not None:
            check_out([f for s in sources.values() for a in ("images", "masks") for f in getattr(s, a, None) or []])
        results = report_segmentation(dm, stages, sources)
        return results, any(r.problems for r in results.values())
    if task == "depth":
        from dptune.data.depth_datamodule import DepthDataModule

        return {}, any(report_depth(DepthDataModule(**quiet(data), num_workers=0), stages, depth_range))
    from dptune.data.multitask_datamodule import MultiTaskDataModule

    for key in ("segmentation", "depth"):
        specs = data.get(key)
        if specs:
            data[key] = [quiet(s) for s in specs] if isinstance(specs, list) else quiet(specs)
    dm, bad = MultiTaskDataModule(**data, num_workers=0), False
    for s in dm.sources:
        print(f"### {s.name} ({KINDS[s.kind]})")
        if s.kind == "segmentation":
            bad |= any(r.problems for r in report_segmentation(s.dm, stages).values())
        else:
            bad |= any(report_depth(s.dm, stages, depth_range))
    return {}, bad


def model_depth_range(cfg: dict[str, Any], where: str) -> tuple[float, float | None]:
    """The config's model.min_depth / model.max_depth (the depth models' defaults where left out)."""
    from dptune.metrics.depth import MIN_DEPTH, check_range

    model = cfg.get("model")
    if model is None:
        return MIN_DEPTH, None
    if not isinstance(model, dict):
        raise ConfigError(f"{where}: model: must be a mapping of model settings, got {type(model).__name__}")
    lo, hi = model.get("min_depth", MIN_DEPTH), model.get("max_depth")
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in (lo, hi) if v is not None):
        raise ConfigError(f"{where}: model.min_depth / model.max_depth must be numbers (metres), got "
                          f"{lo!r} / {hi!r}")
    try:
        check_range(float(lo), None if hi is None else float(hi))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return float(lo), None if hi is None else float(hi)


def refusal(args: argparse.Namespace, task: str) -> str | None:
    """Why the options cannot work for this config's task, or None."""
    if task not in TASKS:
        return f"{args.config}: task {task!r} is not one of {', '.join(TASKS)}"
    if args.class_weights and task != "segmentation":
        return (f"--class-weights is for segmentation configs; {args.config} is a {task} config "
                "(its model takes no class weights)")
    if args.out and not args.class_weights:
        return "--out writes the class weights: give --class-weights too"
    if args.root and task == "multitask":
        return (f"--root: {args.config} is a multitask config with a root per source "
                "(data.segmentation.root, data.depth.root); set them in the config")
    return None


WEIGHTS_HEADER = "-frequency class weights from "  # in the first line of the fragment inspect writes


def check_weights_out(args: argparse.Namespace, files: list[str]) -> None:
    """``--out`` is not the config nor among the data (``files``), and replaces only inspect's own
    weights fragment unless ``--overwrite``."""
    from pathlib import Path

    from dptune.tools.outputs import config_inputs, refuse_among_inputs

    # the config and every file it names (its label file, ...) are inputs too
    refuse_among_inputs(args.out, files, "--out", singles=config_inputs(args.config, args.root))
    out = Path(args.out)
    if out.is_dir() or not out.resolve().parent.is_dir():
        raise ConfigError(f"--out {args.out}: give a file path in a folder that exists")
    if out.exists() and not args.overwrite:
        try:
            first = out.read_text().split("\n", 1)[0]
        except (OSError, UnicodeDecodeError):
            first = ""
        if not (first.startswith("# ") and WEIGHTS_HEADER in first):
            raise ConfigError(f"--out {args.out}: already there and not a class-weights fragment inspect wrote; "
                              "give another path, or --overwrite to replace it")


def write_weights(args: argparse.Namespace, results: dict[str, SplitStats]) -> int:
    if "train" not in results:
        print("error: --class-weights needs a train split", file=sys.stderr)
        return 2
    w = class_weights(results["train"], args.class_weights)
    print(f"class_weights ({args.class_weights}): {w}")
    if args.out:
        from dptune.tools.outputs import write_text

        write_text(args.out, f"# {args.class_weights}{WEIGHTS_HEADER}{args.config} (train split)\n"
                   + yaml.safe_dump({"model": {"class_weights": w}}, default_flow_style=None))
    return 0


def read_config_mapping(path: str) -> dict:
    """A YAML config's mapping; a file that is not text (a picture) or not a mapping is one ``ConfigError``."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML config (not text: a picture or other binary file?)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not readable YAML ({' '.join(str(e).split())})") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: not a config (a YAML mapping with data:, model:, ...; found a "
                          f"{type(cfg).__name__})")
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("config", help="train.py YAML config (any task); its data: section is used")
    ap.add_argument("--root", help="override data.root (segmentation and depth configs)")
    ap.add_argument("--splits", default="train,val,test", help="comma-separated stages to inspect")
    ap.add_argument("--class-weights", choices=["inverse", "median"],
                    help="segmentation configs: compute weights from the train split")
    ap.add_argument("--out", help="with --class-weights: write the weights as a YAML config fragment "
                                  "(model.class_weights); not the config, not among the data")
    ap.add_argument("--overwrite", action="store_true",
                    help="let --out replace a file that is not inspect's own weights fragment")
    args = ap.parse_args(argv)
    try:
        cfg = read_config_mapping(args.config)
        task = str(cfg.get("task") or "segmentation")
        why = refusal(args, task)
        if why:
            print(f"error: {why}", file=sys.stderr)
            return 2
        data = dict(cfg.get("data") or {})
        if args.root:
            data["root"] = args.root
        results, bad = inspect_config(task, data, args.splits.split(","),
                                      (lambda files: check_weights_out(args, files)) if args.out else None,
                                      model_depth_range(cfg, args.config) if task != "segmentation" else None)
    except (DataError, ConfigError, OSError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TypeError as e:  # a key the datamodule does not take
        print(f"error: {args.config}: data: {e}", file=sys.stderr)
        return 2
    if args.class_weights:
        rc = write_weights(args, results)
        if rc:
            return rc
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
