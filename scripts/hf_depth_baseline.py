#!/usr/bin/env python
"""The plain Hugging Face ``Trainer`` depth recipe dptune's depth task is measured against.

What a user writes today, since ``DPTForDepthEstimation`` raises "Training is not implemented yet"
when given labels: a ``Trainer`` whose ``compute_loss`` is a hand-written SILog on pixels with
depth, albumentations ``RandomResizedCrop`` + flip at a square size (depth as a nearest-resized
mask), the image processor's normalisation, AdamW with a polynomial schedule, transformers' own
initialisation, evaluation every epoch, then ``save_pretrained`` of model and image processor.

    python scripts/hf_depth_baseline.py --data-root ../shared/data/7scenes-kitchen \
        --model-config ../shared/bench/dpt-depth-bench-tiny.json --epochs 20 --out runs/hf-depth

It prints images/s over the whole script (start to end, evaluation included) and the last
validation AbsRel and delta1 (predictions upsampled to the 640x480 ground truth).

With transformers' initialisation the depth head's last ReLU starts at 0 everywhere and never
receives a gradient (docs/benchmarks.md); ``--head-bias 2`` is the one-line fix a user finds:
a positive bias on the head's last convolution, so that the first predictions are positive.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

T0 = time.time()

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessorPil, Trainer, TrainingArguments  # noqa: E402


def pairs(root: str, split: str) -> list[tuple[str, str]]:
    images = sorted(glob.glob(os.path.join(root, split, "rgb", "*.jpg")))
    return [(p, os.path.join(root, split, "depth", os.path.basename(p)[:-4] + ".png")) for p in images]


def read_depth(path: str, scale: float) -> np.ndarray:
    return cv2.imread(path, cv2.IMREAD_UNCHANGED).astype(np.float32) / scale


class TrainSet(torch.utils.data.Dataset):
    def __init__(self, pairs, processor, size: int, scale: float) -> None:
        self.pairs, self.processor, self.scale = pairs, processor, scale
        self.aug = A.Compose([A.RandomResizedCrop(size=(size, size), scale=(0.25, 1.0)), A.HorizontalFlip(p=0.5)])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        img = np.asarray(Image.open(self.pairs[i][0]).convert("RGB"))
        out = self.aug(image=img, mask=read_depth(self.pairs[i][1], self.scale))
        pv = self.processor(images=out["image"], do_resize=False, return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pv, "labels": torch.from_numpy(np.ascontiguousarray(out["mask"]))}


class EvalSet(TrainSet):
    def __getitem__(self, i: int) -> dict:
        pv = self.processor(images=Image.open(self.pairs[i][0]).convert("RGB"), return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pv, "labels": torch.from_numpy(read_depth(self.pairs[i][1], self.scale))}


def silog(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    valid = gt > 0
    d = torch.log(pred[valid].clamp(min=1e-3)) - torch.log(gt[valid])
    return torch.sqrt((d**2).mean() - 0.85 * d.mean() ** 2) * 10


class DepthTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        labels = inputs.pop("labels")
        pred = model(**inputs).predicted_depth
        pred = torch.nn.functional.interpolate(pred[:, None], size=labels.shape[-2:], mode="bilinear")[:, 0]
        loss = silog(pred, labels)
        return (loss, {"predicted_depth": pred}) if return_outputs else loss


def compute_metrics(pred) -> dict:
    depth, gt = torch.from_numpy(pred.predictions), pred.label_ids
    up = torch.nn.functional.interpolate(depth[:, None], size=gt.shape[-2:], mode="bilinear")[:, 0].numpy()
    rel, d1 = [], []
    for p, g in zip(up, gt, strict=True):
        v = g > 0
        p, g = np.clip(p[v], 1e-3, None), g[v]
        rel.append(np.mean(np.abs(p - g) / g))
        d1.append(np.mean(np.maximum(p / g, g / p) < 1.25))
    return {"abs_rel": float(np.mean(rel)), "delta1": float(np.mean(d1))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--model-config", required=True)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--depth-scale", type=float, default=1000.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--head-bias", type=float, default=None, help="bias of the head's last conv (default: transformers' init)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (the Trainer's --bf16): the faster choice "
                    "on GPUs and on CPUs with native bf16 (AVX-512 BF16 / AMX)")
    ap.add_argument("--out", default="runs/hf-depth")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    cfg = json.load(open(args.model_config))
    cfg.pop("architectures", None)
    model = DPTForDepthEstimation(DPTConfig(**cfg))
    if args.head_bias is not None:
        with torch.no_grad():
            model.head.head[4].bias.fill_(args.head_bias)
    processor = DPTImageProcessorPil(size={"height": args.size, "width": args.size}, image_mean=[0.5] * 3,
                                     image_std=[0.5] * 3)
    train = TrainSet(pairs(args.data_root, "train"), processor, args.size, args.depth_scale)
    val = EvalSet(pairs(args.data_root, "val"), processor, args.size, args.depth_scale)
    targs = TrainingArguments(
        output_dir=args.out, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="polynomial",
        warmup_steps=0, weight_decay=0.01, eval_strategy="epoch", save_strategy="no", logging_steps=20,
        dataloader_num_workers=args.workers, report_to=[], use_cpu=not torch.cuda.is_available(),
        seed=args.seed, remove_unused_columns=False, disable_tqdm=True, bf16=args.bf16,
    )
    trainer = DepthTrainer(model=model, args=targs, train_dataset=train, eval_dataset=val,
                           compute_metrics=compute_metrics)
    trainer.train()
    final = trainer.evaluate()
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    wall = time.time() - T0
    print(json.dumps({"images_per_s": len(train) * args.epochs / wall, "wall_s": wall,
                      "val_abs_rel": final.get("eval_abs_rel"), "val_delta1": final.get("eval_delta1")}))


if __name__ == "__main__":
    main()
