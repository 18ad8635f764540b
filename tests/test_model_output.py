"""A model whose output is NaN or infinite -- finite weights that overflow the forward pass, as a run
at a learning rate far too high leaves them -- gives no mask, no depth map, no score and no export:
each tool names the image (or the export) and exits 2. Before, NaN logits had an argmax, so predict
wrote class-0 masks and exited 0, evaluate printed an mIoU, and the ONNX parity check passed
(``max(0.0, nan)`` is 0.0)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAMVID, KITCHEN, needs
from test_joint_tools import save_joint_export

from dptune.export.cli import main as export_main
from dptune.labels import LabelSet
from dptune.tools.evaluate import main as evaluate_main
from dptune.tools.predict import main as predict_main

pytestmark = [needs(CAMVID), needs(KITCHEN)]
SEG_FRAMES = "val/0016E5_0799[13].jpg"  # two frames
DEPTH_FRAMES = "val/rgb/frame-00060[02].jpg"


def overflow(folder: Path, cls) -> None:
    """Scale the last convolution of the model in ``folder`` by 1e38: every weight stays finite, the
    output does not (it is what one update at lr 1e4 did to a real run's head)."""
    model = cls.from_pretrained(folder)
    last = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.fill_(1e38)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory) -> Path:
    """A segmentation + depth export (CamVid's classes) whose heads overflow; ``segmentation/`` and
    ``depth/`` are each a model of one task."""
    from transformers import DPTForDepthEstimation, DPTForSemanticSegmentation

    out = save_joint_export(tmp_path_factory.mktemp("overflowing"), LabelSet.from_yaml(CAMVID / "labels.yaml").names)
    overflow(out / "segmentation", DPTForSemanticSegmentation)
    overflow(out / "depth", DPTForDepthEstimation)
    return out


def errors(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]


@pytest.mark.parametrize("part,images", [("segmentation", CAMVID / SEG_FRAMES), ("depth", KITCHEN / DEPTH_FRAMES),
                                          ("", KITCHEN / DEPTH_FRAMES)])
def test_predict_writes_nothing_for_a_model_whose_output_overflows_and_exits_2(overflowing, part, images, tmp_path,
                                                                               capsys):
    out = tmp_path / "pred"
    rc = predict_main(["--model", str(overflowing / part), "--images", str(images), "--out", str(out)])
    err = errors(capsys)
    assert rc == 2, err
    frames = sorted(images.parent.glob(images.name))
    assert len(frames) == 2 and len(err) == 3, err  # one line per image, then the count
    for frame, line in zip(frames, err, strict=False):
        assert line.startswith(f"error: {frame}: the model's") and "NaN or infinite" in line, line
    assert not list(out.glob("*.png")) and not list(out.glob("*.ply")), sorted(out.iterdir())


def test_evaluate_gives_no_score_for_a_model_whose_output_overflows(overflowing, tmp_path, capsys):
    rc = evaluate_main(["--model", str(overflowing / "segmentation"), "--images", SEG_FRAMES, "--masks",
                        "valannot/{stem}.png", "--labels", "labels.yaml", "--root", str(CAMVID),
                        "--json", str(tmp_path / "s.json")])
    err = errors(capsys)
    image = str(sorted(CAMVID.glob(SEG_FRAMES))[0])  # the image, not its mask
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {image}: ") and "NaN or infinite" in err[0], err
    assert not (tmp_path / "s.json").exists()
    rc = evaluate_main(["--model", str(overflowing / "depth"), "--images", str(KITCHEN / DEPTH_FRAMES),
                        "--depth", str(KITCHEN / "val" / "depth" / "{stem}.png"), "--json", str(tmp_path / "d.json")])
    err = errors(capsys)
    image = str(sorted(KITCHEN.glob(DEPTH_FRAMES))[0])  # the image, not its depth map
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {image}: ") and "NaN or infinite" in err[0], err
    assert not (tmp_path / "d.json").exists()


@pytest.mark.parametrize("part", ["segmentation", "depth"])  # a joint export is exported from its checkpoint
@pytest.mark.parametrize("onnx", [["--onnx"], []])  # without an ONNX graph (and its parity check) it exited 0
def test_export_refuses_a_model_whose_output_overflows(overflowing, part, onnx, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(overflowing / part, source)
    rc = export_main([str(source), str(tmp_path / "out"), *onnx])
    err = errors(capsys)
    assert rc == 2 and len(err) == 1 and "NaN or infinite" in err[0], err
    assert not (tmp_path / "out").exists()


NEAR_MAX = float(torch.finfo(torch.float32).max) * 0.99


def edges_near_the_limit(x: torch.Tensor) -> torch.Tensor:
    """A finite depth output (1, h, w) for the input ``x``: a checkerboard of 0 and values near the
    float32 limit, whose bicubic upsampling overshoots each edge past it."""
    h, w = x.shape[-2:]
    board = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2
    return (board * NEAR_MAX).float()[None]


def test_depth_upsampled_past_the_float32_limit_is_refused_not_written(overflowing):
    # the model's output was checked, then post-processed: its bicubic upsampling made inf / NaN
    # from finite values, and predict wrote the map (rc 0)
    from PIL import Image

    from dptune.errors import ModelOutputError
    from dptune.inference.depth_predictor import DepthPredictor
    from dptune.tools.multitask import load_joint, one_pass

    image = np.asarray(Image.open(sorted(KITCHEN.glob(DEPTH_FRAMES))[0]).convert("RGB"))
    p = DepthPredictor.load(str(overflowing / "depth"))
    p.graph = lambda x: {"predicted_depth": edges_near_the_limit(x).numpy()}
    with pytest.raises(ModelOutputError, match="upsampled to the image is NaN or infinite"):
        p.predict(image)
    seg, depth, _ = load_joint(str(overflowing), "cpu")

    def joint(x):  # one backbone pass: finite logits, depth near the limit
        return torch.zeros(1, seg.model.config.num_labels, *x.shape[-2:]), None, edges_near_the_limit(x)

    with pytest.raises(ModelOutputError, match="upsampled to the image is NaN or infinite"):
        one_pass(joint, seg, depth, image)


def test_the_flip_average_of_depth_near_the_float32_limit_stays_finite():
    from dptune.tools.depth import depth_views

    class Constant:  # a depth model's prediction: finite, near the limit, whatever the view
        def predict(self, image):
            return np.full(image.shape[:2], NEAR_MAX, np.float32)

    depth = depth_views(Constant(), np.zeros((4, 6, 3), np.uint8), flip="h")
    assert np.isfinite(depth).all() and np.allclose(depth, NEAR_MAX), depth  # (a + b) / 2 was inf


def test_a_serving_graph_whose_output_alone_is_nan_is_blamed_on_its_conversion(tiny_config):
    # the torch model's output on the same input is checked first and is finite: the message said
    # the weights overflowed, sending the user to retrain a model that was fine
    from transformers import DPTConfig, DPTForSemanticSegmentation

    from dptune.errors import ModelOutputError
    from dptune.export.measure import Reference, every_output

    class Broken:  # an INT8 graph that quantization broke
        path = Path("model_int8.onnx")

        def __call__(self, x):
            return {"logits": np.full((1, 3, 8, 8), np.nan, np.float32)}

    model = DPTForSemanticSegmentation(DPTConfig(**tiny_config, num_labels=3)).eval()
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    with pytest.raises(ModelOutputError, match=r"model_int8.onnx is NaN or infinite \(the INT8 quantization broke "
                                               r"it: keep the offending nodes in float \(--int8-keep-float\)"):
        every_output(Reference(model, joint=False), {"int8": Broken()}, x)


def test_onnx_parity_runs_the_model_on_inputs_a_real_image_can_give(tmp_path, monkeypatch):
    # normal-distributed inputs reach |x| > 4 where this processor's images give [-1, 1]: a model fine
    # on every image could overflow on them and be refused
    from dptune.export.onnx import TaskOutput

    source = save_joint_export(tmp_path / "src", ["a", "b", "c"]) / "segmentation"  # mean 0.5, std 0.5
    seen = []
    forward = TaskOutput.forward

    def spy(self, pixel_values):
        if not torch.jit.is_tracing():
            seen.append((float(pixel_values.min()), float(pixel_values.max())))
        return forward(self, pixel_values)

    monkeypatch.setattr(TaskOutput, "forward", spy)
    assert export_main([str(source), str(tmp_path / "out"), "--onnx"]) == 0
    assert len(seen) >= 3, seen  # the pre-write check and the parity's shapes
    assert all(-1 <= lo and hi <= 1 for lo, hi in seen), seen


@pytest.mark.parametrize("kw", [{}, {"mode": "slide"}, {"flip": "h", "scales": (0.5, 1.0)}])
def test_logits_at_the_float32_limit_give_no_mask(overflowing, kw):
    # finite logits exactly at the limit pass the output check; bilinear upsampling then rounds some
    # past it to inf, and softmax made the confidences NaN (a mask was written)
    from PIL import Image

    from dptune.errors import ModelOutputError
    from dptune.inference.predictor import Predictor

    image = np.asarray(Image.open(sorted(CAMVID.glob(SEG_FRAMES))[0]).convert("RGB"))
    p = Predictor.load(str(overflowing / "segmentation"))
    top = float(torch.finfo(torch.float32).max)

    def at_the_limit(x):  # classes alternating between +max and -max over the pixels
        h, w = x.shape[-2:]
        board = ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 * 2 - 1).float() * top
        return {"logits": torch.stack([board, -board, board])[None].expand(x.shape[0], -1, -1, -1).numpy()}

    p.graph = at_the_limit
    p.model.config.num_labels = 3
    try:
        pred, conf = p.predict(image, **kw)
    except ModelOutputError:
        return
    assert np.isfinite(conf).all(), "a mask from NaN confidences"
