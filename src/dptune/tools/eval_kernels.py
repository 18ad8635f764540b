"""Times the pieces of validation and prediction that are not the model, on this machine.

    python -m dptune.tools.eval_kernels

Per-pixel classes (``argmax`` against ``max(dim).indices``, ``dptune.metrics.segmentation.class_map``),
the non-finite check of a batch's logits (``dptune.metrics.finite_rows``), the full-resolution
validation loss, and the encoding of a logged depth panel (PNG against JPEG). Shapes: CamVid
validation (8 images, 11 classes, 360 x 480; the logits of a bfloat16 batch come out of the
model channels-last) and one 720 x 960 image's logits as ``predict`` computes them. Best of
``ROUNDS`` timed rounds after a warm-up, on the threads torch uses.
"""

from __future__ import annotations

import io
import time

import cv2
import numpy as np
import torch

ROUNDS = 5


def best_ms(fn) -> float:
    fn()
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def rows() -> list[tuple[str, str, float, float]]:
    """(what, shape, before ms, now ms) for each kernel."""
    from PIL import Image

    from dptune.losses.segmentation import cross_entropy
    from dptune.metrics import finite_rows
    from dptune.metrics.segmentation import class_map
    from dptune.tasks.visuals import JPEG_OPTIONS, depth_panel

    gen = torch.Generator().manual_seed(0)
    batch = torch.randn(8, 11, 360, 480, generator=gen).contiguous(memory_format=torch.channels_last)
    image = torch.randn(11, 720, 960, generator=gen)
    target = torch.randint(0, 11, (8, 360, 480), generator=gen)
    out = []
    for name, scores, dim in (("validation batch, channels-last", batch, 1), ("one image (predict)", image, 0)):
        shape = "x".join(map(str, scores.shape))
        out.append((f"classes: {name}", shape, best_ms(lambda s=scores, d=dim: s.argmax(d)),
                    best_ms(lambda s=scores, d=dim: class_map(s, d))))
    diverged = batch.clone(memory_format=torch.preserve_format)
    diverged[:, 3, 5, 7] = float("nan")  # every sample non-finite: the second, exact pass runs on all
    for name, scores in (("validation batch", batch), ("diverged batch (NaN in every sample)", diverged)):
        out.append((f"non-finite check: {name}", "x".join(map(str, scores.shape)),
                    best_ms(lambda s=scores: torch.isfinite(s).reshape(s.shape[0], -1).all(1)),
                    best_ms(lambda s=scores: finite_rows(s))))
    loss = best_ms(lambda: cross_entropy(batch, target, torch.ones(11)))
    out.append(("validation loss (weighted cross-entropy)", "x".join(map(str, batch.shape)), loss, loss))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    photo = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    gt = (1.0 + xx / 320.0 + yy / 480.0).astype(np.float32)
    panel = depth_panel(photo, gt, gt * (1 + 0.05 * rng.standard_normal(gt.shape)).astype(np.float32))

    def jpeg() -> None:
        cv2.imencode(".jpg", cv2.cvtColor(panel, cv2.COLOR_RGB2BGR),
                     [cv2.IMWRITE_JPEG_QUALITY, JPEG_OPTIONS["quality"], cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                      cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])

    out.append(("depth panel encoding (W&B's PNG -> JPEG q90)", "x".join(map(str, panel.shape)),
                best_ms(lambda: Image.fromarray(panel).save(io.BytesIO(), format="PNG")), best_ms(jpeg)))
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    argparse.ArgumentParser(prog="python -m dptune.tools.eval_kernels", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False).parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| kernel | shape | before ms | dptune ms | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for what, shape, before, now in rows():
        print(f"| {what} | {shape} | {before:.1f} | {now:.1f} | {before / now:.1f}x |")


if __name__ == "__main__":
    main()
