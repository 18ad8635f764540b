#!/usr/bin/env python
"""The plain Hugging Face ``Trainer`` recipe dptune is measured against.

What a user would write without dptune: ``DPTForSemanticSegmentation`` with its own loss,
albumentations pad / random-resized-crop / flip, the image processor's normalisation, AdamW
with a polynomial schedule, evaluation every epoch, then ``save_pretrained`` of model and
image processor (square size, as plain transformers needs).

    python scripts/hf_baseline.py --data-root ../shared/data/camvid \
        --model-config ../shared/bench/dpt-bench-tiny.json --epochs 16 --out runs/hf-baseline
    python scripts/hf_baseline.py --dataset dubai --data-root ../shared/data/dubai-aerial \
        --model-config ../shared/bench/dpt-bench-tiny.json --epochs 40 --crop 384 --out runs/hf-dubai

It prints images/s over the whole script (start to end, evaluation included) and val mIoU.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

T0 = time.time()

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    DPTConfig,
    DPTForSemanticSegmentation,
    DPTImageProcessorPil,
    Trainer,
    TrainingArguments,
)

CAMVID = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
          "Bicyclist"]
DUBAI = {"Building": (60, 16, 152), "Land": (132, 41, 246), "Road": (110, 193, 228), "Vegetation": (254, 221, 58),
         "Water": (226, 169, 41), "Unlabeled": (155, 155, 155)}


def camvid_pairs(root: str, split: str) -> list[tuple[str, str]]:
    images = sorted(glob.glob(os.path.join(root, split, "*.jpg")))
    return [(p, os.path.join(root, split + "annot", os.path.basename(p)[:-4] + ".png")) for p in images]


def dubai_pairs(root: str, split: str) -> list[tuple[str, str]]:
    tiles = "[1-5]" if split == "train" else "6"  # tile 6 held out, as in configs/dubai.yaml
    images = sorted(glob.glob(os.path.join(root, f"Tile {tiles}", "images", "*.jpg")))
    return [(p, os.path.join(os.path.dirname(p), "..", "masks", os.path.basename(p)[:-4] + ".png")) for p in images]


def read_mask(path: str, num_labels: int) -> np.ndarray:
    im = Image.open(path)
    if num_labels == len(DUBAI):  # RGB colour codes, some palette PNGs; black borders unlabelled
        rgb = np.asarray(im.convert("RGB")).astype(np.int64)
        key = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        mask = np.full(key.shape, 255, np.int64)
        for i, (r, g, b) in enumerate(DUBAI.values()):
            mask[key == (r << 16 | g << 8 | b)] = i
        return mask
    mask = np.asarray(im).astype(np.int64)
    mask[mask >= num_labels] = 255  # CamVid's 11 = void
    return mask


class TrainSet(torch.utils.data.Dataset):
    def __init__(self, pairs, processor, crop: int, num_labels: int) -> None:
        self.pairs, self.processor, self.num_labels = pairs, processor, num_labels
        self.aug = A.Compose([
            A.PadIfNeeded(crop, crop, fill=0, fill_mask=255),
            A.RandomResizedCrop(size=(crop, crop), scale=(0.25, 1.0)),
            A.HorizontalFlip(p=0.5),
        ])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        img = np.asarray(Image.open(self.pairs[i][0]).convert("RGB"))
        mask = read_mask(self.pairs[i][1], self.num_labels)
        out = self.aug(image=img, mask=mask)
        pv = self.processor(images=out["image"], do_resize=False, return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pv, "labels": torch.from_numpy(out["mask"].astype(np.int64))}


class EvalSet(TrainSet):
    def __getitem__(self, i: int) -> dict:
        img = Image.open(self.pairs[i][0]).convert("RGB")
        mask = read_mask(self.pairs[i][1], self.num_labels)
        pv = self.processor(images=img, return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pv, "labels": torch.from_numpy(mask)}


def miou(confmat: np.ndarray) -> float:
    tp = np.diag(confmat)
    union = confmat.sum(0) + confmat.sum(1) - tp
    return float(np.nanmean(np.where(union > 0, tp / np.maximum(union, 1), np.nan)))


def make_compute_metrics(num_labels: int):
    def compute(pred) -> dict:
        logits, labels = pred.predictions, pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        up = torch.nn.functional.interpolate(torch.from_numpy(logits), size=labels.shape[-2:], mode="bilinear")
        p = up.argmax(1).numpy()
        v = (labels >= 0) & (labels != 255)  # the Trainer pads label maps of other sizes with -100
        cm = np.bincount(labels[v] * num_labels + p[v], minlength=num_labels**2).reshape(num_labels, num_labels)
        return {"mIoU": miou(cm)}

    return compute


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--dataset", choices=["camvid", "dubai"], default="camvid")
    ap.add_argument("--model-config", required=True)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=192)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (the Trainer's --bf16): the faster "
                    "choice on GPUs and on CPUs with native bf16 (AVX-512 BF16 / AMX)")
    ap.add_argument("--seed", type=int, default=0, help="model init and data order (albumentations draws its own seed)")
    ap.add_argument("--out", default="runs/hf-baseline")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    names = CAMVID if args.dataset == "camvid" else list(DUBAI)
    pairs = camvid_pairs if args.dataset == "camvid" else dubai_pairs
    cfg = json.load(open(args.model_config))
    cfg.pop("architectures", None)
    config = DPTConfig(**cfg, num_labels=len(names), id2label=dict(enumerate(names)),
                       label2id={n: i for i, n in enumerate(names)})
    model = DPTForSemanticSegmentation(config)
    processor = DPTImageProcessorPil(size={"height": args.crop, "width": args.crop},
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
    train = TrainSet(pairs(args.data_root, "train"), processor, args.crop, len(names))
    val = EvalSet(pairs(args.data_root, "val"), processor, args.crop, len(names))
    targs = TrainingArguments(
        output_dir=args.out, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="polynomial",
        warmup_steps=0, weight_decay=0.01, eval_strategy="epoch", save_strategy="no", logging_steps=20,
        dataloader_num_workers=args.workers, report_to=[], use_cpu=not torch.cuda.is_available(),
        bf16=args.bf16, seed=args.seed, remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train, eval_dataset=val,
                      compute_metrics=make_compute_metrics(len(names)))
    trainer.train()
    final = trainer.evaluate()
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    wall = time.time() - T0
    print(json.dumps({"images_per_s": len(train) * args.epochs / wall, "wall_s": wall,
                      "val_mIoU": final.get("eval_mIoU")}))


if __name__ == "__main__":
    main()
