"""Look at a dataset before training on it: sizes, class frequencies, bad masks, class weights.

    python scripts/inspect_data.py configs/camvid.yaml --root ../shared/data/camvid
    python scripts/inspect_data.py configs/camvid.yaml --class-weights median --out weights.yaml
    python train.py fit --config configs/camvid.yaml --config weights.yaml

Reads the ``data:`` section of a train.py config (no train.py needed).
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from dptune.errors import ConfigError, DataError
from dptune.labels import IGNORE_INDEX, LabelSet


@dataclass
class SplitStats:
    name: str
    images: int = 0
    sizes: list[tuple[int, int]] = field(default_factory=list)
    pixels: np.ndarray | None = None  # per class, plus ignore at index C
    present: np.ndarray | None = None  # pixels of the images in which each class appears
    problems: list[str] = field(default_factory=list)


def image_size(source: Any, i: int) -> tuple[int, int]:
    """(h, w) from the header when the source is a folder, by decoding otherwise."""
    path = getattr(source, "images", None)
    if path is not None:
        from PIL import Image

        with Image.open(path[i]) as im:
            return im.size[1], im.size[0]
    image, _, _ = source.load(i)
    return image.shape[:2]


def mask_counts(source: Any, labels: LabelSet, i: int) -> np.ndarray:
    """Per-class pixel counts of one encoded mask (ignore counted in the last slot)."""
    from dptune.data.sources import read_mask

    if hasattr(source, "masks"):
        raw, name = read_mask(source.masks[i], labels.mask_format == "rgb"), source.masks[i]
    else:
        _, raw, name = source.load(i)
    enc = labels.encode(raw, name)
    counts = np.bincount(enc.ravel(), minlength=256)
    return np.append(counts[: labels.num_classes], counts[IGNORE_INDEX])


def inspect_split(stage: str, source: Any, labels: LabelSet, workers: int = 2) -> SplitStats:
    stats = SplitStats(stage, images=len(source))
    c = labels.num_classes
    stats.pixels = np.zeros(c + 1, np.int64)
    stats.present = np.zeros(c, np.int64)

    def one(i: int):
        try:
            return image_size(source, i), mask_counts(source, labels, i)
        except DataError as e:
            return None, str(e)

    with ThreadPoolExecutor(workers) as pool:
        for size, counts in tqdm(pool.map(one, range(len(source))), total=len(source), desc=stage, leave=False):
            if size is None:
                stats.problems.append(counts)
                continue
            stats.sizes.append(size)
            stats.pixels += counts
            stats.present += np.where(counts[:c] > 0, counts.sum(), 0)
    return stats


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


def format_report(stats: SplitStats, labels: LabelSet) -> str:
    lines = [f"== {stats.name}: {stats.images} images, {len(stats.problems)} with problems"]
    if stats.sizes:
        hs = np.array([s[0] for s in stats.sizes])
        ws = np.array([s[1] for s in stats.sizes])
        lines.append(f"   size (w x h): min {ws.min()}x{hs.min()}  median {int(np.median(ws))}x{int(np.median(hs))}"
                     f"  max {ws.max()}x{hs.max()}")
    total = max(int(stats.pixels.sum()), 1)
    lines.append(f"   ignored pixels: {stats.pixels[-1] / total:.4f}")
    lines.append(f"   {'class':<20} {'pixels':>12} {'frequency':>10}")
    labelled = max(int(stats.pixels[:-1].sum()), 1)
    for name, n in zip(labels.names, stats.pixels[:-1], strict=True):
        lines.append(f"   {name:<20} {int(n):>12d} {n / labelled:>10.4f}")
    for p in stats.problems[:20]:
        lines.append(f"   bad: {p}")
    if len(stats.problems) > 20:
        lines.append(f"   ... and {len(stats.problems) - 20} more")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="train.py YAML config; its data: section is used")
    ap.add_argument("--root", help="override data.root")
    ap.add_argument("--splits", default="train,val,test", help="comma-separated stages to inspect")
    ap.add_argument("--class-weights", choices=["inverse", "median"], help="compute weights from the train split")
    ap.add_argument("--out", help="write the weights as a YAML config fragment (model.class_weights)")
    args = ap.parse_args(argv)
    from dptune.data.datamodule import SegmentationDataModule
    from dptune.data.sources import build_source

    try:
        cfg = yaml.safe_load(open(args.config)) or {}
        data = dict(cfg.get("data") or {})
        if args.root:
            data["root"] = args.root
        data.update(check=False, cache=False, num_workers=0)
        dm = SegmentationDataModule(**data)
        results = {}
        for stage in args.splits.split(","):
            if stage not in dm.splits:
                continue
            src = build_source(dm.source_kind, dict(dm.splits[stage]), dm.root,
                               dm.label_set.mask_format == "rgb", stage, dm.hf)
            results[stage] = inspect_split(stage, src, dm.label_set)
            print(format_report(results[stage], dm.label_set))
    except (DataError, OSError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.class_weights:
        if "train" not in results:
            print("error: --class-weights needs a train split", file=sys.stderr)
            return 2
        w = class_weights(results["train"], args.class_weights)
        print(f"class_weights ({args.class_weights}): {w}")
        if args.out:
            with open(args.out, "w") as f:
                f.write(f"# {args.class_weights}-frequency class weights from {args.config} (train split)\n")
                yaml.safe_dump({"model": {"class_weights": w}}, f, default_flow_style=None)
    return 1 if any(r.problems for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
