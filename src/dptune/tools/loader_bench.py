"""``scripts/benchmark.py --data CONFIG``: images/s of one loader worker, dptune's pipeline (no cache,
disk cache, in-memory cache) against the same augmentations done the common PIL way.

    python scripts/benchmark.py --data configs/camvid.yaml --root ../shared/data/camvid --samples 200
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


class PILPipeline:
    """The same augmentations done the common PIL way, for the loader comparison: decode with PIL,
    rescale the whole image, pad, crop, flip, jitter with ImageEnhance, normalise to float32 by
    ``prep`` (the model's mean/std)."""

    def __init__(self, pairs, labels, crop: int, base: int, prep, scale=(0.75, 1.5), seed: int = 0) -> None:
        import random

        self.pairs, self.labels, self.crop, self.base, self.scale = pairs, labels, crop, base, scale
        self.prep = prep
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        import numpy as np
        import torch
        from PIL import Image, ImageEnhance, ImageOps

        r = self.rng
        img = Image.open(self.pairs[i][0]).convert("RGB")
        mask = Image.fromarray(self.labels.encode(np.asarray(Image.open(self.pairs[i][1])), self.pairs[i][1]))
        s = r.uniform(*self.scale)
        size = (max(1, round(self.base * s)), max(1, round(self.base * s)))
        img, mask = img.resize(size, Image.BILINEAR), mask.resize(size, Image.NEAREST)
        pw, ph = max(0, self.crop - size[0]), max(0, self.crop - size[1])
        if pw or ph:
            img = ImageOps.expand(img, (0, 0, pw, ph), fill=0)
            mask = ImageOps.expand(mask, (0, 0, pw, ph), fill=255)
        x, y = r.randint(0, img.width - self.crop), r.randint(0, img.height - self.crop)
        img, mask = img.crop((x, y, x + self.crop, y + self.crop)), mask.crop((x, y, x + self.crop, y + self.crop))
        if r.random() < 0.5:
            img, mask = ImageOps.mirror(img), ImageOps.mirror(mask)
        if r.random() < 0.8:
            for enh in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                img = enh(img).enhance(r.uniform(0.75, 1.25))
        pixels = self.prep.pixel_values(np.asarray(img), resize=False)[0]
        return pixels, torch.from_numpy(np.asarray(mask).astype(np.int64))


def _preprocessing(model: dict[str, Any], size):
    """The spec a run of this config would prepare images with: its normalisation resolved as the
    task resolves it (``resolve_normalization``: ``model.image_mean/image_std``, else the
    pretrained checkpoint's image processor, else the backbone family's statistics)."""
    from dptune.models.normalization import resolve_normalization, settings_family
    from dptune.preprocessing import Preprocessing

    mean, std, _, _ = resolve_normalization(model.get("image_mean"), model.get("image_std"), model.get("pretrained"),
                                            settings_family(model))
    return Preprocessing.of_task(size, mean, std)


def time_loader(opts: dict[str, Any]) -> dict[str, Any]:
    """Images/s of one loader worker: the dataset's __getitem__ in a loop, in this process."""
    import cv2
    import yaml

    from dptune.data.datamodule import SegmentationDataModule

    cv2.setNumThreads(0)  # as in loader workers
    config = yaml.safe_load(open(opts["data"])) or {}
    data = dict(config.get("data") or {})
    if opts.get("root"):
        data["root"] = opts["root"]
    if opts["cache"] == "disk" and data.get("source", "folder") != "folder":
        return {"skipped": f"data.source {data['source']}: the disk cache reads folder sources only"}
    data.update(check=False, cache=opts["cache"], num_workers=0)
    if opts["cache"] == "disk":
        data["cache_dir"] = os.path.join(opts["tmp"], "cache")
    dm = SegmentationDataModule(**data)
    ds = dm.dataset("train")  # with a cache this decodes every sample once (and writes it), as train.py does
    if opts["pipeline"] == "pil":
        src = ds.source
        if not (hasattr(src, "images") and getattr(src, "masks", None) is not None):
            return {"skipped": f"{type(src).__name__}: no image and mask files for PIL to read"}
        ds = PILPipeline(list(zip(src.images, src.masks, strict=True)), dm.label_set, dm.crop_size[0],
                         dm.image_size[0], _preprocessing(config.get("model") or {}, dm.image_size), dm.scale_range)
    n = min(len(ds), opts["samples"])
    for i in range(3):
        ds[i]
    t = time.perf_counter()
    for i in range(n):
        ds[i % len(ds)]
    return {"images_per_s": n / (time.perf_counter() - t)}



def loader_benchmark(args) -> int:
    """Per-worker loader throughput: dptune's pipeline (disk and in-memory cache) against PIL."""
    from dptune.tools.jobs import run_job

    results: dict[str, Any] = {"data": args.data, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    import tempfile

    base = {"data": args.data, "root": args.root, "samples": args.samples, "tmp": tempfile.mkdtemp(prefix="dptune-")}
    runs = [("dptune", {"pipeline": "dptune", "cache": False}), ("dptune_disk", {"pipeline": "dptune", "cache": "disk"}),
            ("dptune_cached", {"pipeline": "dptune", "cache": "memory"}), ("pil", {"pipeline": "pil", "cache": False})]
    print(f"# loader images/s per worker (one process), {args.data}, {args.samples} samples")
    for name, o in runs:
        r = run_job(time_loader, {**base, **o})
        results[name] = r
        if "skipped" in r:
            print(f"{name:<14} skipped: {r['skipped']}")
            continue
        print(f"{name:<14} {r.get('images_per_s', float('nan')):8.1f} images/s" + (f"  {r['error']}" if "error" in r else ""))
    if "images_per_s" in results["pil"]:
        for name in ("dptune", "dptune_disk", "dptune_cached"):
            if "images_per_s" in results[name]:  # not a failed or skipped row
                results[f"{name}_vs_pil"] = results[name]["images_per_s"] / results["pil"]["images_per_s"]
                print(f"{name} / PIL: {results[f'{name}_vs_pil']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if any("error" in r for r in results.values() if isinstance(r, dict)) else 0
