"""Segmentation + depth in one model through train.py: CamVid masks and 7-Scenes depth mixed."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CAMVID, KITCHEN, REPO, TINY, needs
from test_train import run_train

from dptune.data.multitask_datamodule import JointTrainSet, source_weights

pytestmark = [needs(CAMVID), needs(KITCHEN)]


@pytest.mark.slow
def test_joint_fit_validates_each_task_and_rebuilds_from_its_checkpoint(tmp_path):
    from dptune.tasks.checkpoints import load_module

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    seg = {"train": {"images": "train/0001TP_0069*.jpg", "masks": "trainannot/{stem}.png"},
           "val": {"images": "val/0016E5_0799*.jpg", "masks": "valannot/{stem}.png"}}
    depth = {"train": {"images": "train/rgb/frame-0000[0-2]*.jpg", "depth": "train/depth/{stem}.png"},
             "val": {"images": "val/rgb/frame-00060[0-4].jpg", "depth": "val/depth/{stem}.png"}}
    run = tmp_path / "run"
    run_train(["fit", "--config", str(REPO / "configs" / "multitask" / "camvid-7scenes.yaml"),
               "--data.segmentation.root", str(CAMVID), "--data.depth.root", str(KITCHEN),
               "--data.segmentation.splits", json.dumps(seg), "--data.depth.splits", json.dumps(depth),
               "--model.config", str(config), "--data.image_size", "64", "--data.batch_size", "4",
               "--data.num_workers", "0", "--trainer.max_epochs", "1", "--trainer.precision", "32-true",
               "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
               "--model.references", json.dumps({"mIoU": 0.3, "abs_rel": 0.2}),
               "--trainer.default_root_dir", str(run)], cwd=tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    val = torch.load(ckpt, map_location="cpu")["dptune"]["metrics"]["val"]
    assert 0 <= val["mIoU"] <= 1 and 0 < val["abs_rel"] < 1
    expected = 100 * ((val["mIoU"] - 0.3) / 0.3 - (val["abs_rel"] - 0.2) / 0.2) / 2
    assert val["delta_m"] == pytest.approx(expected)
    module = load_module(str(ckpt))
    assert module.task == "multitask" and module.model.depth.dpt is module.model.seg.dpt
    assert module.label_set.names[0] == "Sky"

    # export: one stock directory per task, one ONNX graph with both outputs
    import numpy as np
    import onnxruntime as ort
    from PIL import Image
    from transformers import AutoModelForDepthEstimation, DPTForSemanticSegmentation, pipeline

    from dptune.export import export

    out = export(ckpt, tmp_path / "export", onnx=True)
    seg_model = DPTForSemanticSegmentation.from_pretrained(out / "segmentation").eval()
    depth_model = AutoModelForDepthEstimation.from_pretrained(out / "depth").eval()
    assert seg_model.config.id2label[0] == "Sky" and depth_model.config.depth_units == "metres"
    assert "mIoU" in (out / "segmentation" / "README.md").read_text()
    assert "AbsRel" in (out / "depth" / "README.md").read_text()
    frame = Image.open(sorted((KITCHEN / "val" / "rgb").glob("*.jpg"))[0])
    assert pipeline("depth-estimation", model=str(out / "depth"))(frame)["predicted_depth"].shape == (480, 640)
    assert len(pipeline("image-segmentation", model=str(out / "segmentation"))(frame)) >= 1
    x = torch.randn(1, 3, 64, 96)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, depth = sess.run(["logits", "predicted_depth"], {"pixel_values": x.numpy()})
    with torch.no_grad():
        ref = module.model.eval()(x)
        square = torch.randn(1, 3, 64, 64)  # plain transformers' ViT DPT: square inputs
        joint_logits, _, joint_depth = module.model(square)
        assert torch.allclose(seg_model(pixel_values=square).logits, joint_logits, atol=1e-5)
        assert torch.allclose(depth_model(pixel_values=square).predicted_depth, joint_depth, atol=1e-5)
    assert np.abs(logits - ref[0].numpy()).max() <= 1e-4 * np.abs(ref[0].numpy()).max()
    assert np.abs(depth - ref[2].numpy()).max() <= 1e-4 * np.abs(ref[2].numpy()).max()


def test_mixed_stream_fills_the_missing_label_and_follows_the_ratio():
    seg = [{"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "mask": torch.ones(4, 4, dtype=torch.uint8), "index": i}
           for i in range(30)]
    depth = [{"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "depth": torch.ones(4, 4), "index": i} for i in range(10)]
    data = JointTrainSet(seg, depth)
    assert len(data) == 40
    assert (data[0]["depth"] == 0).all() and (data[35]["mask"] == 255).all()  # "no label" of the other task
    from torch.utils.data import WeightedRandomSampler

    weights = source_weights(30, 10, 0.25)  # a quarter of the samples from segmentation
    drawn = list(WeightedRandomSampler(weights, 4000, generator=torch.Generator().manual_seed(0)))
    share = sum(k < 30 for k in drawn) / len(drawn)
    assert abs(share - 0.25) < 0.03


def test_predict_writes_masks_and_depth_from_one_forward_equal_to_each_export(tmp_path):
    """scripts/predict.py on a segmentation + depth export: masks equal the segmentation export's,
    depth equals the depth export's (16-bit millimetres), from one backbone pass."""
    import numpy as np
    from PIL import Image

    from dptune.depth_predictor import DepthPredictor
    from dptune.models import build_model
    from dptune.models.depth import build_depth_model
    from dptune.models.joint import JointDPT
    from dptune.predictor import Predictor
    from dptune.tools.predict import main as predict_main

    depth_cfg = {k: v for k, v in TINY.items() if k not in ("use_auxiliary_head", "semantic_loss_ignore_index")}
    torch.manual_seed(0)
    joint = JointDPT(build_model(["a", "b", "c"], config=dict(TINY)), build_depth_model(config=depth_cfg)).eval()
    from transformers import DPTImageProcessorPil

    proc = DPTImageProcessorPil(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    for name, model in (("segmentation", joint.seg), ("depth", joint.depth)):
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(tmp_path / "out" / name)
        proc.save_pretrained(tmp_path / "out" / name)
    frame = sorted((KITCHEN / "val" / "rgb").glob("*.jpg"))[0]
    assert predict_main(["--model", str(tmp_path / "out"), "--images", str(frame), "--out", str(tmp_path / "p")]) == 0
    image = np.asarray(Image.open(frame).convert("RGB"))
    mask = np.asarray(Image.open(tmp_path / "p" / f"{frame.stem}.png"))
    assert np.array_equal(mask, Predictor.load(str(tmp_path / "out" / "segmentation")).predict(image)[0])
    depth = np.asarray(Image.open(tmp_path / "p" / f"{frame.stem}_depth.png")).astype(np.float64) / 1000
    ref = np.clip(DepthPredictor.load(str(tmp_path / "out" / "depth")).predict(image), 0, None)
    assert np.abs(depth - ref).max() <= 0.0005 + 1e-6

