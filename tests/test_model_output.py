"""A model whose output is NaN or infinite -- finite weights that overflow the forward pass, as a run
at a learning rate far too high leaves them -- gives no mask, no depth map, no score and no export:
each tool names the image (or the export) and exits 2. Before, NaN logits had an argmax, so predict
wrote class-0 masks and exited 0, evaluate printed an mIoU, and the ONNX parity check passed
(``max(0.0, nan)`` is 0.0)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import CAMVID, KITCHEN, needs
from test_joint_tools import save_joint_export

from dptune.export import main as export_main
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
    assert rc == 2 and len(err) == 1 and "0016E5_07991" in err[0] and "NaN or infinite" in err[0], err
    assert not (tmp_path / "s.json").exists()
    rc = evaluate_main(["--model", str(overflowing / "depth"), "--images", str(KITCHEN / DEPTH_FRAMES),
                        "--depth", str(KITCHEN / "val" / "depth" / "{stem}.png"), "--json", str(tmp_path / "d.json")])
    err = errors(capsys)
    assert rc == 2 and len(err) == 1 and "frame-000600" in err[0] and "NaN or infinite" in err[0], err
    assert not (tmp_path / "d.json").exists()


@pytest.mark.parametrize("part", ["segmentation", "depth"])  # a joint export is exported from its checkpoint
def test_export_refuses_a_model_whose_output_overflows(overflowing, part, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(overflowing / part, source)
    rc = export_main([str(source), str(tmp_path / "out"), "--onnx"])
    err = errors(capsys)
    assert rc == 2 and len(err) == 1 and "NaN or infinite" in err[0], err
    assert not (tmp_path / "out").exists()
