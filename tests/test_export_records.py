"""An export's own records edited by hand, or an input its graph cannot take: one line naming the file
and the problem, never a traceback nor a mask or score silently other than the model's (g7 review)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import CAMVID, KITCHEN, needs
from test_onnx_backend import exports  # noqa: F401  (the module fixture: tiny segmentation and depth exports)

pytest.importorskip("onnxruntime")
pytestmark = [needs(CAMVID), needs(KITCHEN)]


def _copy(exports, name, tmp_path):  # noqa: F811
    out = tmp_path / name
    shutil.copytree(exports / name, out)
    return out


def _edit(path, change) -> None:
    spec = json.loads(path.read_text())
    change(spec)
    path.write_text(json.dumps(spec))


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _predict(model, image, out, *extra) -> int:
    from dptune.tools.predict import main

    return main(["--model", str(model), "--images", str(image), "--out", str(out), *map(str, extra)])


def _set_depth(key, value):
    return lambda spec: spec["depth"].__setitem__(key, value)


@pytest.mark.parametrize("name, change, said", [
    ("seg", lambda spec: spec.clear(), "no labels"),  # KeyError: 'labels'
    ("seg", lambda spec: spec.__setitem__("labels", "x"), "labels is a JSON str"),  # "dictionary update sequence ..."
    ("depth", lambda spec: spec.__setitem__("depth", "metric"), "depth is a JSON str"),  # AttributeError
    ("depth", _set_depth("mode", "relative"), "config.json's depth_mode is 'metric'"),  # relative depth, silently
    ("depth", _set_depth("max_depth", "ten"), "depth.max_depth 'ten'"),  # "could not convert string to float"
])
def test_a_hand_edited_dptune_json_is_one_line_naming_it(exports, tmp_path, capsys, name, change, said):  # noqa: F811
    model = _copy(exports, name, tmp_path)
    _edit(model / "dptune.json", change)
    image = sorted(CAMVID.glob("val/*.jpg"))[0] if name == "seg" else sorted(KITCHEN.glob("val/rgb/*.jpg"))[0]
    assert _predict(model, image, tmp_path / "out") == 2
    line = _one_error(capsys)
    assert str(model / "dptune.json") in line and said in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, said", [
    (lambda held: held[:4] * 3, "more than once"),  # 4 images scored 3 times each, as 12
    (lambda held: held[0], "not a list of image paths"),  # read letter by letter
])
def test_a_hand_edited_held_back_list_is_one_line(exports, tmp_path, capsys, change, said):  # noqa: F811
    from dptune.tools.evaluate import main

    model = _copy(exports, "seg", tmp_path)
    data = lambda spec: spec["serving"]["data"]["segmentation"]  # noqa: E731
    _edit(model / "dptune.json", lambda spec: data(spec).__setitem__("held_back", change(data(spec)["held_back"])))
    rc = main(["--model", str(model), "--root", str(CAMVID), "--images", "val/*.jpg", "--masks", "valannot/{stem}.png",
               "--labels", "labels.yaml", "--backend", "onnx", "--held-back"])
    line = _one_error(capsys)
    assert rc == 2 and "held_back" in line and said in line, line


def test_the_onnx_backend_refuses_an_input_size_the_model_cannot_take(exports, tmp_path, capsys):  # noqa: F811
    """A processor size of 100x150 (not a multiple of the patch size 16): torch refused it, the graph gave
    96x160 logits that were upsampled into a mask, exit 0."""
    for name, image in (("seg", sorted(CAMVID.glob("val/*.jpg"))[0]), ("depth", sorted(KITCHEN.glob("val/rgb/*.jpg"))[0])):
        model = _copy(exports, name, tmp_path)
        _edit(model / "preprocessor_config.json", lambda spec: spec.__setitem__("size", {"height": 100, "width": 150}))
        for backend in ("torch", "onnx"):
            assert _predict(model, image, tmp_path / f"{name}-{backend}", "--backend", backend) == 2
            err = capsys.readouterr().err  # the image's line, then how many images could not be predicted
            assert f"{image}: input 100x150 is not a multiple of" in err and "Traceback" not in err, err[-2000:]
            assert not list((tmp_path / f"{name}-{backend}").glob(f"{image.stem}*.png"))


def test_a_calibrated_export_re_exported_keeps_saying_its_temperature_and_is_not_calibrated_twice(exports, tmp_path):  # noqa: F811
    """Re-exported, the temperature stayed in the weights but the card's section and dptune.json's record
    were gone; calibrated again, the card gave T = 1.0 and "the masks are those of the uncalibrated model"
    for a model whose T was 8.6 (g7 review). The record was kept, but not the list of held-back images its
    figures were measured on: evaluate --held-back said none were recorded."""
    import torch

    from dptune.errors import ConfigError
    from dptune.export import export
    from dptune.export.serving import ServingOptions

    data = str(exports / "data.yaml")
    with torch.no_grad():
        export(str(exports / "seg-src"), tmp_path / "cal", serving=ServingOptions(temperature=True, data=data, count=4))
        export(str(tmp_path / "cal"), tmp_path / "again")
    record = json.loads((tmp_path / "cal" / "dptune.json").read_text())["serving"]["calibration"]
    assert json.loads((tmp_path / "again" / "dptune.json").read_text())["serving"]["calibration"] == record
    assert "## Calibrated confidence" in (tmp_path / "again" / "README.md").read_text()
    # and the images its figures were measured on, which evaluate --held-back scores
    from dptune.export.held_back import held_back_images

    assert held_back_images(tmp_path / "again", "segmentation") == held_back_images(tmp_path / "cal", "segmentation")
    with pytest.raises(ConfigError, match="calibrated already"), torch.no_grad():
        export(str(tmp_path / "cal"), tmp_path / "twice", serving=ServingOptions(temperature=True, data=data, count=4))
    assert not (tmp_path / "twice").exists()


def test_copies_of_validation_images_given_as_calibration_images_are_not_held_back(exports, tmp_path):  # noqa: F811
    """Copies were matched by path only: calibrated on them, the export measured on them too, and the card
    said its figures were of images held back from calibration (g7 review)."""
    import torch
    from test_onnx_backend import EVAL_IMAGES

    from dptune.export import export
    from dptune.export.serving import ServingOptions

    split = sorted(CAMVID.glob(EVAL_IMAGES))
    (tmp_path / "cal").mkdir()
    for p in split[:4]:
        shutil.copy(p, tmp_path / "cal" / f"copy_{p.name}")
    with torch.no_grad():
        export(str(exports / "seg-src"), tmp_path / "out", serving=ServingOptions(
            int8=True, data=str(exports / "data.yaml"), calibration_images=str(tmp_path / "cal"), count=4))
    held = json.loads((tmp_path / "out" / "dptune.json").read_text())["serving"]["data"]["segmentation"]["held_back"]
    assert sorted(held) == sorted(p.relative_to(CAMVID).as_posix() for p in split[4:])


def test_files_a_calibration_glob_matches_that_are_no_images_are_said(tmp_path, caplog):
    """`--calibration-images "dir/*"` left notes.txt out without a word (g7 review)."""
    import logging

    import numpy as np
    from PIL import Image

    from dptune.export.calibration_images import glob_images

    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.INFO, logger="dptune.export.calibration_images"):
        assert len(glob_images(str(tmp_path / "*"), 32)) == 4
    assert "1 matched file is not an image by its extension and left out" in caplog.text
    assert str(tmp_path / "notes.txt") in caplog.text
