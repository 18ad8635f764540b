"""evaluate.py and predict.py against plain transformers on real CamVid frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAMVID, needs
from PIL import Image

from dptune.labels import LabelSet
from dptune.tasks.segmentation import SegmentationModule
from dptune.tools.evaluate import main as evaluate_main
from dptune.tools.predict import main as predict_main

pytestmark = needs(CAMVID)
VAL = "val/0016E5_0799*.jpg"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from conftest import TINY

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("export")
    labels = LabelSet.from_yaml(CAMVID / "labels.yaml")
    m = SegmentationModule(config=dict(TINY), label_spec=labels.to_dict(), image_size=64)
    with torch.no_grad():  # settle the BatchNorm statistics, as training would: logits of a trained model's size
        for _ in range(10):
            m(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8))
    m.eval()
    m.model.save_pretrained(out)
    m.image_processor().save_pretrained(out)
    (out / "dptune.json").write_text(json.dumps({"labels": labels.to_dict()}))  # as export.py writes it
    return out


def plain_transformers(out, frames):
    """The independent evaluator: transformers + numpy, the directory's own processor."""
    from transformers import AutoImageProcessor, DPTForSemanticSegmentation

    model = DPTForSemanticSegmentation.from_pretrained(out).eval()
    proc = AutoImageProcessor.from_pretrained(out)
    preds = {}
    for f in frames:
        img = Image.open(f).convert("RGB")
        with torch.no_grad():
            logits = model(**proc(images=img, return_tensors="pt")).logits
        up = torch.nn.functional.interpolate(logits, size=img.size[::-1], mode="bilinear", align_corners=False)
        preds[f.stem] = up.argmax(1)[0].numpy()
    return preds


def test_evaluate_matches_the_independent_evaluator(exported, tmp_path):
    frames = sorted(CAMVID.glob(VAL))
    preds = plain_transformers(exported, frames)
    cm = np.zeros((11, 11), np.int64)
    for f in frames:
        gt = np.asarray(Image.open(CAMVID / "valannot" / f"{f.stem}.png"))
        v = gt < 11
        cm += np.bincount(gt[v].astype(np.int64) * 11 + preds[f.stem][v], minlength=121).reshape(11, 11)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    ref = np.nanmean(np.where(union > 0, tp / np.maximum(union, 1), np.nan))
    rc = evaluate_main(["--model", str(exported), "--images", VAL, "--masks", "valannot/{stem}.png",
                        "--labels", "labels.yaml", "--root", str(CAMVID), "--device", "cpu",
                        "--json", str(tmp_path / "s.json"), "--confusion", str(tmp_path / "cm.png")])
    assert rc == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert abs(scores["mIoU"] - ref) < 1e-9
    assert np.array_equal(np.array(scores["confusion"]), cm)
    assert (tmp_path / "cm.png").stat().st_size > 1000


def test_d4_tta_averages_the_eight_turned_views(exported, tmp_path):
    """--flip d4 = mean class probabilities of plain transformers on the processor's input turned
    by 0/90/180/270 degrees, with and without a mirror, each turned back."""
    from transformers import AutoImageProcessor, DPTForSemanticSegmentation

    from dptune.inference.predictor import Predictor

    frame = sorted(CAMVID.glob(VAL))[0]
    img = Image.open(frame).convert("RGB")
    model = DPTForSemanticSegmentation.from_pretrained(exported).eval()
    x = AutoImageProcessor.from_pretrained(exported)(images=img, return_tensors="pt")["pixel_values"]
    ref = 0
    with torch.no_grad():
        for turns in range(4):
            for mirror in (False, True):
                v = torch.rot90(x, turns, (2, 3))
                lg = model(pixel_values=v.flip(3) if mirror else v).logits
                lg = torch.rot90(lg.flip(3) if mirror else lg, -turns, (2, 3))
                ref = ref + torch.nn.functional.interpolate(lg, size=img.size[::-1], mode="bilinear",
                                                            align_corners=False).softmax(1)
    predictor = Predictor.load(str(exported), "cpu")
    ours = predictor.probs(np.asarray(img), mode="whole", flip="d4")
    assert torch.allclose(ours, ref[0] / 8, atol=1e-5)
    single = predictor.probs(np.asarray(img), mode="whole")
    assert (ours.argmax(0) != single.argmax(0)).float().mean() > 0.01  # the views disagree: TTA is not a no-op
    rc = evaluate_main(["--model", str(exported), "--images", VAL, "--masks", "valannot/{stem}.png",
                        "--labels", "labels.yaml", "--root", str(CAMVID), "--device", "cpu", "--mode", "slide",
                        "--flip", "d4", "--json", str(tmp_path / "s.json")])
    assert rc == 0 and json.loads((tmp_path / "s.json").read_text())["flip"] == "d4"


def test_score_plain_agrees_with_evaluate_whole_and_slide(exported, tmp_path):
    """scripts/score_plain.py (plain transformers + numpy, no dptune) and dptune agree: equal
    whole-image scores, and equal sliding-window probabilities on every frame (an untrained
    model's argmax has near-ties that rounding may flip: the probabilities are compared, not
    the slide scores)."""
    import importlib.util
    import subprocess
    import sys

    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    from dptune.inference.predictor import Predictor

    script = Path(__file__).resolve().parents[1] / "scripts" / "score_plain.py"
    res = subprocess.run([sys.executable, str(script), str(exported), "--images", str(CAMVID / VAL),
                          "--masks", str(CAMVID / "valannot" / "{stem}.png"), "--num-classes", "11", "--mode", "both"],
                         capture_output=True, text=True, check=True)
    plain = {d["mode"]: d for d in map(json.loads, res.stdout.strip().splitlines())}
    assert set(plain) == {"whole", "slide"} and all(d["images"] == len(list(CAMVID.glob(VAL))) for d in plain.values())
    assert evaluate_main(["--model", str(exported), "--images", VAL, "--masks", "valannot/{stem}.png",
                          "--labels", "labels.yaml", "--root", str(CAMVID), "--device", "cpu",
                          "--json", str(tmp_path / "whole.json")]) == 0
    assert abs(json.loads((tmp_path / "whole.json").read_text())["mIoU"] - plain["whole"]["mIoU"]) < 1e-4

    spec = importlib.util.spec_from_file_location("score_plain", script)
    score_plain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score_plain)
    model = AutoModelForSemanticSegmentation.from_pretrained(exported).eval()
    proc = AutoImageProcessor.from_pretrained(exported)
    predictor = Predictor.load(str(exported), "cpu")
    for frame in sorted(CAMVID.glob(VAL)):
        img = Image.open(frame).convert("RGB")
        ref = score_plain.slide_logits(model, proc, img).softmax(1)[0]
        assert torch.allclose(predictor.probs(np.asarray(img), mode="slide"), ref, atol=1e-6)
    assert score_plain.starts(100, 32, 21) == [0, 21, 42, 63, 68]


def test_predict_masks_equal_the_transformers_pipeline(exported, tmp_path):
    from transformers import pipeline

    frames = sorted(CAMVID.glob(VAL))[:2]
    rc = predict_main(["--model", str(exported), "--images", str(CAMVID / VAL), "--out", str(tmp_path),
                       "--confidence", "--device", "cpu"])
    assert rc == 0
    seg = pipeline("image-segmentation", model=str(exported))
    names = {v: int(k) for k, v in seg.model.config.id2label.items()}
    for f in frames:
        ours = np.asarray(Image.open(tmp_path / f"{f.stem}.png"))
        theirs = np.full(ours.shape, 255, np.uint8)
        for r in seg(Image.open(f)):
            theirs[np.asarray(r["mask"]) > 0] = names[r["label"]]
        assert np.array_equal(ours, theirs)
        overlay = np.asarray(Image.open(tmp_path / f"{f.stem}_overlay.png"))
        assert overlay.shape[0] == 360 and overlay.shape[1] > 480  # image plus legend
        assert (tmp_path / f"{f.stem}_confidence.png").exists()


def test_predict_refuses_what_a_segmentation_model_cannot_do_in_one_line(exported, tmp_path, capsys):
    """--intrinsics was ignored on a segmentation model; a bad --scales ended in a traceback."""
    frame = str(sorted(CAMVID.glob(VAL))[0])
    bad_scales = [["--scales", s] for s in ("1,big", "0", "inf", "0.001", "1e3")]  # inf, tiny, huge: tracebacks before
    for extra in (["--intrinsics", "585,585,320,240"], *bad_scales):
        rc = predict_main(["--model", str(exported), "--images", frame, "--out", str(tmp_path), *extra])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
        assert rc == 2 and len(err) == 1 and extra[0] in err[0], err
    assert not list(tmp_path.iterdir())


def test_evaluate_bad_input_is_one_line(tmp_path, capsys):
    rc = evaluate_main(["--model", str(tmp_path / "nope"), "--images", "x/*.jpg", "--masks", "{stem}.png",
                        "--labels", str(CAMVID / "labels.yaml"), "--root", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_export_cli_onnx_parity_and_re_export(exported, tmp_path):
    import onnxruntime as ort

    from dptune.export.cli import main as export_main

    out = tmp_path / "again"
    assert export_main([str(exported), str(out), "--onnx"]) == 0  # from an exported directory
    for f in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "model.onnx"):
        assert (out / f).exists(), f
    assert "| 3 | Road | (128, 64, 128) |" in (out / "README.md").read_text()
    from dptune.inference.predictor import Predictor

    assert Predictor.load(str(out)).labels.colors == LabelSet.from_yaml(CAMVID / "labels.yaml").colors
    from transformers import DPTForSemanticSegmentation

    from dptune.models import segment

    model = DPTForSemanticSegmentation.from_pretrained(out).eval()
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 64, 64), (2, 3, 64, 96), (1, 3, 96, 48)]:  # square and non-square
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = segment(model, x, with_aux=False)[0].numpy()
        got = sess.run(["logits"], {"pixel_values": x.numpy()})[0]
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_onnx_masks_equal_the_pipeline_on_real_frames(exported, tmp_path):
    """Check 1 of the inference issue: pipeline, predict.py and ONNX Runtime give the same masks on
    held-out frames; ONNX also on non-square inputs (the frame's own aspect, 64 x 96)."""
    import onnxruntime as ort
    from transformers import AutoImageProcessor, pipeline

    from dptune.export.cli import main as export_main

    out = tmp_path / "onnx"
    assert export_main([str(exported), str(out), "--onnx"]) == 0
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    proc = AutoImageProcessor.from_pretrained(out)
    seg = pipeline("image-segmentation", model=str(out))
    names = {v: int(k) for k, v in seg.model.config.id2label.items()}
    assert predict_main(["--model", str(out), "--images", str(CAMVID / VAL), "--out", str(tmp_path / "p")]) == 0
    for f in sorted(CAMVID.glob(VAL))[:3]:
        img = Image.open(f).convert("RGB")
        logits = sess.run(["logits"], {"pixel_values": proc(images=img, return_tensors="np")["pixel_values"]})[0]
        up = torch.nn.functional.interpolate(torch.from_numpy(logits), size=img.size[::-1], mode="bilinear",
                                             align_corners=False)
        onnx_mask = up.argmax(1)[0].numpy().astype(np.uint8)
        piped = np.full(onnx_mask.shape, 255, np.uint8)
        for r in seg(img):
            piped[np.asarray(r["mask"]) > 0] = names[r["label"]]
        assert np.array_equal(onnx_mask, piped)
        assert np.array_equal(onnx_mask, np.asarray(Image.open(tmp_path / "p" / f"{f.stem}.png")))
        wide = proc(images=img, size={"height": 64, "width": 96}, return_tensors="np")["pixel_values"]
        got = sess.run(["logits"], {"pixel_values": wide})[0]
        from dptune.models import segment

        with torch.no_grad():
            ref = segment(seg.model, torch.from_numpy(wide), with_aux=False)[0].numpy()
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
        assert np.array_equal(got.argmax(1), ref.argmax(1))


def test_evaluate_refuses_a_label_set_with_other_names_or_order(exported, tmp_path, capsys):
    """Same class count, other names (or the same names reordered): scoring would compare class i of
    one label set with class i of the other. One line, exit 2, naming the model and the label file
    (a class count that differs said "the model has 11 classes, the label set 10", naming neither)."""
    names = LabelSet.from_yaml(CAMVID / "labels.yaml").names
    labels = tmp_path / "labels.yaml"
    for changed, message in [([*names[:3], "Street", *names[4:]], "class 3 is 'Road' in the model but 'Street'"),
                             ([names[1], names[0], *names[2:]], "same classes in another order"),
                             (names[:-1], f"{exported}: the model has 11 classes, the label set {labels} 10")]:
        labels.write_text(json.dumps({"names": changed, "ignore_values": [11]}))
        rc = evaluate_main(["--model", str(exported), "--images", VAL, "--masks", "valannot/{stem}.png",
                            "--labels", str(labels), "--root", str(CAMVID)])
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def test_model_card_says_how_the_metrics_were_measured():
    from transformers import DPTImageProcessorPil

    from dptune.export import model_card

    labels = LabelSet(names=["a", "b"])
    proc = DPTImageProcessorPil(size={"height": 192, "width": 192})
    metrics = {"val": {"mIoU": 0.5, "pixel_acc": 0.7, "mAcc": 0.6, "IoU": [0.4, 0.6]}}
    slide = model_card(labels, proc, metrics, "x.ckpt", evaluation={"mode": "slide", "size": 192, "stride": 2 / 3})
    assert "sliding 192x192 windows at each image's native resolution" in slide and "--mode slide" in slide
    whole = model_card(labels, proc, metrics, "x.ckpt", evaluation={"mode": "resize", "size": 192})
    assert "whole images resized to 192x192" in whole and "sliding" not in whole
