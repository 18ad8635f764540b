"""How many validation images a checkpoint's metrics came from: counted per task, exact across
processes, carried by the checkpoint and stated on the exported model card."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY
from lightning.pytorch import Trainer

from dptune.labels import LabelSet
from dptune.metrics.depth import DepthMetrics
from dptune.metrics.segmentation import ConfusionMatrix

DEPTH_TINY = {k: v for k, v in TINY.items() if k not in ("use_auxiliary_head", "semantic_loss_ignore_index")}
LABELS = LabelSet(names=["a", "b", "c"])


def _rank_counts(rank: int, world: int, port: int, out: str) -> None:
    from dptune.metrics import summed_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = 3 if rank == 0 else 2  # shards of 3 and 2, as the evaluation sampler splits 5 frames
    target = torch.zeros(n, 4, 4, dtype=torch.long)
    target[0] = 255  # no labelled pixel: scored by nobody
    seg, depth = ConfusionMatrix(3), DepthMetrics()
    seg.update(torch.zeros_like(target), target)
    gt = torch.ones(n, 4, 4)
    depth.update(gt.clone(), gt, gt > 0)
    seg.compute(), depth.compute()  # the tasks compute the figures first
    counts = {"seg": int(summed_state(seg, "images")), "depth": int(summed_state(depth, "images")),
              "seg_local_after": int(seg.images)}
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(counts, f)
    dist.destroy_process_group()


def test_image_counts_are_summed_across_processes(tmp_path):
    """``metric.images`` read after ``compute()`` is this process's own count (torchmetrics syncs
    only inside compute and restores the local state); ``summed_state`` gives every process the total."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_counts, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert [g["seg"] for g in got] == [3, 3]  # 5 samples, one without a label
    assert [g["depth"] for g in got] == [5, 5]
    assert [g["seg_local_after"] for g in got] == [2, 1]  # the local count is left for accumulation


def _seg_batches():
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 3, (4, 64, 64), generator=g)
    masks[3] = 255  # an image without a labelled pixel is not scored
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=g)
    return [{"image": images[i:j], "mask": masks[i:j], "sizes": [(64, 64)] * (j - i)} for i, j in ((0, 2), (2, 4))]


def _depth_batches():
    g = torch.Generator().manual_seed(1)
    depth = 0.5 + 3 * torch.rand(5, 64, 64, generator=g)
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=g)
    return [{"image": images[i:j], "depth": depth[i:j], "sizes": [(64, 64)] * (j - i)} for i, j in ((0, 2), (2, 5))]


def _same(batch):
    return batch


def _validate_and_export(module, loaders, tmp_path):
    from dptune.export import export

    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, dataloaders=[torch.utils.data.DataLoader(b, batch_size=None, collate_fn=_same)
                                                   for b in loaders])
    ckpt = tmp_path / "x.ckpt"
    trainer.save_checkpoint(ckpt)
    metrics = torch.load(ckpt, map_location="cpu", weights_only=True)["dptune"]["metrics"]
    return metrics, export(str(ckpt), tmp_path / "out")


def test_segmentation_checkpoint_and_card_say_how_many_images(tmp_path):
    from dptune.tasks.segmentation import SegmentationModule

    torch.manual_seed(0)
    module = SegmentationModule(config=dict(TINY), label_spec=LABELS.to_dict(), image_size=64)
    metrics, out = _validate_and_export(module, [_seg_batches()], tmp_path)
    assert metrics["val"]["images"] == 3
    assert f"mIoU {metrics['val']['mIoU']:.4f} on 3 validation images" in (out / "README.md").read_text()


def test_depth_checkpoint_and_card_say_how_many_images(tmp_path):
    from dptune.tasks.depth import DepthModule

    torch.manual_seed(0)
    module = DepthModule(config=dict(DEPTH_TINY), image_size=64, max_depth=10.0)
    metrics, out = _validate_and_export(module, [_depth_batches()], tmp_path)
    assert metrics["val"]["images"] == 5
    assert "averaged over 5 validation images" in (out / "README.md").read_text()


def test_multitask_counts_each_task_on_its_own_data(tmp_path):
    from dptune.tasks.multitask import MultiTaskModule

    torch.manual_seed(0)
    module = MultiTaskModule(config=dict(TINY), label_spec=LABELS.to_dict(), image_size=64, max_depth=10.0)
    metrics, out = _validate_and_export(module, [_seg_batches(), _depth_batches()], tmp_path)
    assert metrics["segmentation"]["val"]["images"] == 3 and metrics["depth"]["val"]["images"] == 5
    card = (out / "README.md").read_text()
    assert "on 3 validation images" in card.split("- segmentation:", 1)[1].splitlines()[0]
    assert "on 5 validation images" in card.split("- depth:", 1)[1].splitlines()[0]
    assert "on 3 validation images" in (out / "segmentation" / "README.md").read_text()
    assert "averaged over 5 validation images" in (out / "depth" / "README.md").read_text()


@pytest.mark.parametrize("n, words", [(1, "1 validation image"), (101, "101 validation images")])
def test_model_card_states_the_count(n, words):
    from transformers import DPTImageProcessorPil

    from dptune.export.card import model_card

    proc = DPTImageProcessorPil(size={"height": 64, "width": 64})
    val = {"mIoU": 0.41, "pixel_acc": 0.7, "mAcc": 0.6, "IoU": [0.4, 0.5, 0.33], "images": n}
    card = model_card(LABELS, proc, {"val": val}, "x.ckpt")
    assert f"mIoU 0.4100 on {words}," in card
    del val["images"]  # a checkpoint from before the count: no claim
    assert "validation image" not in model_card(LABELS, proc, {"val": val}, "x.ckpt").split("## Validation")[1]
