"""The files users really have: phone photos stored turned with an EXIF orientation tag, ``.JPG``
beside ``.jpg``, one file name in two folders, empty and tiny images, exports that ship code, and
output paths that point at the inputs. Read the way every viewer and ``transformers`` read them,
none left out or overwritten without a word."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CAMVID, KITCHEN, REPO, TINY, camvid_subset, needs, run_python
from PIL import Image, ImageOps

from dptune.data.images import image_header_size, read_image
from dptune.data.masks import read_mask
from dptune.data.sources import FolderSource
from dptune.errors import ConfigError, DataError
from dptune.tools.evaluate import main as evaluate_main
from dptune.tools.inspect import main as inspect_main
from dptune.tools.predict import main as predict_main

pytestmark = needs(CAMVID)
FRAMES = sorted((CAMVID / "val").glob("*.jpg"))[:3] if CAMVID.is_dir() else []
UPRIGHT_ROTATION = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A tiny segmentation + depth export: ``joint/``, with ``joint/segmentation`` and ``joint/depth``
    the single-task models (each a stock transformers directory)."""
    from test_joint_tools import save_joint_export

    return save_joint_export(tmp_path_factory.mktemp("models") / "joint", ["a", "b", "c"])


def turned(frame: Path, orientation: int) -> Image.Image:
    """The frame's pixels stored as a phone stores them: turned so that ``orientation`` brings them upright."""
    return Image.open(frame).convert("RGB").transpose(UPRIGHT_ROTATION[orientation])


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder below ``folder`` with its content hash: what "byte-for-byte unchanged" compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def camvid_model(path: Path) -> Path:
    """A tiny random segmentation model of CamVid's label set, saved as a stock transformers directory."""
    from dptune.labels import LabelSet
    from dptune.tasks.segmentation import SegmentationModule

    labels = LabelSet.from_yaml(CAMVID / "labels.yaml")
    m = SegmentationModule(config=dict(TINY), label_spec=labels.to_dict(), image_size=64).eval()
    m.model.save_pretrained(path)
    m.image_processor().save_pretrained(path)
    return path


def errors(capsys) -> list[str]:
    return [ln.strip() for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.strip().startswith("error")]


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ============================================================================ EXIF orientation
@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_every_exif_orientation_is_applied_as_pil_exif_transpose_does(tmp_path, fmt):
    frame = Image.open(FRAMES[0]).convert("RGB")
    for orientation in range(1, 9):
        path = tmp_path / f"o{orientation}.{fmt}"
        frame.save(path, exif=exif(orientation), **({"quality": 95} if fmt == "jpeg" else {}))
        ref = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
        ours = read_image(str(path))
        assert ours.shape == ref.shape, orientation
        assert np.abs(ours.astype(int) - ref).max() <= (1 if fmt == "jpeg" else 0), orientation
        assert image_header_size(str(path)) == ref.shape[:2], orientation  # the header-only check agrees
    if fmt == "png":  # a label map with the tag is turned the same way (as Hugging Face datasets decode it)
        label = Image.open(CAMVID / "valannot" / f"{FRAMES[0].stem}.png")
        for orientation in range(1, 9):
            label.save(tmp_path / "label.png", exif=exif(orientation))
            ref = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "label.png")))
            assert np.array_equal(read_mask(str(tmp_path / "label.png"), rgb=False), ref), orientation


def test_a_photo_stored_turned_trains_aligned_with_its_label(tmp_path):
    """A CamVid frame stored turned a quarter with orientation 6 (as phones store portrait photos),
    its label drawn on the picture as shown: training and validation read the two aligned, both in
    the pre-flight check (header sizes) and in the batches."""
    from dptune.data.datamodule import SegmentationDataModule

    root = tmp_path / "d"
    for sub in ("img", "ann"):
        (root / sub).mkdir(parents=True)
    shutil.copy(CAMVID / "labels.yaml", root / "labels.yaml")
    for frame in FRAMES[:2]:
        turned(frame, 6).save(root / "img" / f"{frame.stem}.jpg", quality=95, exif=exif(6))
        shutil.copy(CAMVID / "valannot" / f"{frame.stem}.png", root / "ann" / f"{frame.stem}.png")
    splits = {s: {"images": "img/*.jpg", "masks": "ann/{stem}.png"} for s in ("train", "val")}
    for check in (True, "header"):
        dm = SegmentationDataModule(root=str(root), splits=splits, image_size=64, batch_size=2, num_workers=0,
                                    check=check)
        dm.setup("fit")  # stopped with "mask is 480x360 but its image is 360x480" before
        image, mask = dm.datasets["train"].load(0)
        assert image.shape[:2] == mask.shape == (360, 480)
        upright = np.asarray(Image.open(FRAMES[0]).convert("RGB")).astype(int)
        assert np.abs(image.astype(int) - upright).mean() < 3  # the picture as shown, not turned
        batch = next(iter(dm.val_dataloader()))
        assert tuple(batch["mask"].shape[-2:]) == (360, 480) and batch["sizes"][0] == (360, 480)


def test_a_label_drawn_on_the_stored_pixels_is_one_line_that_names_exif(tmp_path, capsys):
    frame = FRAMES[0]
    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    turned(frame, 6).save(tmp_path / "img" / "x.jpg", quality=95, exif=exif(6))
    Image.open(CAMVID / "valannot" / f"{frame.stem}.png").transpose(UPRIGHT_ROTATION[6]).save(tmp_path / "ann" / "x.png")
    source = FolderSource(str(tmp_path), "img/*.jpg", "ann/{stem}.png")
    for read in (source.load, source.probe):
        with pytest.raises(DataError, match=r"ann/x\.png: is 360x480 but its image .*x\.jpg is 480x360 .*EXIF orientation \(6\)"):
            read(0)
    # inspect says the same (it compared no sizes, then only the sizes)
    shutil.copy(CAMVID / "labels.yaml", tmp_path / "labels.yaml")
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"data": {"root": str(tmp_path), "labels": "labels.yaml",
                                           "splits": {"val": {"images": "img/*.jpg", "masks": "ann/{stem}.png"}}}}))
    assert inspect_main([str(config), "--splits", "val"]) != 0
    assert re.search(r"ann/x\.png: is 360x480 but its image .*x\.jpg is 480x360 .*EXIF orientation \(6\)",
                     capsys.readouterr().out)


def test_predict_reads_a_turned_photo_as_pipeline_does(models, tmp_path):
    """Masks, overlays and depth of a photo stored turned (orientation 8, JPEG and lossless PNG) are
    those of the upright picture: what ``pipeline(...)`` gives for the same file."""
    from transformers import pipeline

    frame = FRAMES[1]
    (tmp_path / "in").mkdir()
    turned(frame, 8).save(tmp_path / "in" / "phone.jpg", quality=95, exif=exif(8))
    turned(frame, 8).save(tmp_path / "in" / "phone.png", exif=exif(8))
    Image.open(frame).convert("RGB").save(tmp_path / "in" / "upright.png")
    assert predict_main(["--model", str(models), "--images", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                         "--device", "cpu"]) == 0
    out = tmp_path / "out"
    assert read_png(out / "phone.png").shape == (360, 480)  # phone.jpg; phone.png's are phone_png*
    assert np.array_equal(read_png(out / "phone_png.png"), read_png(out / "upright.png"))
    assert np.array_equal(read_png(out / "phone_png_depth.tiff"), read_png(out / "upright_depth.tiff"))
    seg = pipeline("image-segmentation", model=str(models / "segmentation"))
    names = {v: int(k) for k, v in seg.model.config.id2label.items()}
    theirs = np.full((360, 480), 255, np.uint8)
    for r in seg(str(tmp_path / "in" / "phone.jpg")):
        theirs[np.asarray(r["mask"]) > 0] = names[r["label"]]
    assert np.array_equal(read_png(out / "phone.png"), theirs)


# ============================================================================ nothing left out
def test_a_jpg_glob_takes_the_upper_case_extensions_too(models, tmp_path):
    """5 ``.jpg`` and 3 ``.JPG`` (as cameras write them): all 8 train and all 8 are predicted."""
    root = tmp_path / "d"
    for sub in ("img", "ann"):
        (root / sub).mkdir(parents=True)
    for i in range(8):
        name = f"f{i}.{'JPG' if i % 3 == 1 else 'jpg'}"
        shutil.copy(FRAMES[i % len(FRAMES)], root / "img" / name)
        shutil.copy(CAMVID / "valannot" / f"{FRAMES[i % len(FRAMES)].stem}.png", root / "ann" / f"f{i}.png")
    assert len(FolderSource(str(root), "img/*.jpg", "ann/{stem}.png")) == 8  # 5 before
    assert predict_main(["--model", str(models / "segmentation"), "--images", str(root / "img" / "*.jpg"),
                         "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("f?.png")) == [f"f{i}.png" for i in range(8)]


def test_inputs_that_share_a_name_each_get_their_own_prediction(models, tmp_path):
    """``a/x.jpg`` and ``b/x.jpg`` (and ``x.jpg`` beside ``x.png``) gave one prediction, the last."""
    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "in" / "b").mkdir()
    shutil.copy(FRAMES[0], tmp_path / "in" / "a" / "x.jpg")
    shutil.copy(FRAMES[1], tmp_path / "in" / "b" / "x.jpg")
    Image.open(FRAMES[2]).save(tmp_path / "in" / "b" / "x.png")
    for frame in FRAMES:
        shutil.copy(frame, tmp_path / "in" / frame.name)
    out = tmp_path / "out"
    assert predict_main(["--model", str(models / "segmentation"), "--images", str(tmp_path / "in" / "**" / "*.*"),
                         "--out", str(out), "--device", "cpu"]) == 0
    alone = {}
    for i, frame in enumerate(FRAMES):  # the same pixels predicted on their own
        assert predict_main(["--model", str(models / "segmentation"), "--images", str(frame), "--out",
                             str(tmp_path / f"alone{i}"), "--device", "cpu"]) == 0
        alone[i] = read_png(tmp_path / f"alone{i}" / f"{frame.stem}.png")
    assert np.array_equal(read_png(out / "a" / "x.png"), alone[0])
    assert np.array_equal(read_png(out / "b" / "x.png"), alone[1])
    assert np.array_equal(read_png(out / "b" / "x_png.png"), alone[2])
    assert not np.array_equal(alone[0], alone[1])  # the two x.png really are two predictions
    assert len(list(out.rglob("*_overlay.png"))) == 3 + len(FRAMES)


# ============================================================================ bad files: one line each
def test_an_empty_jpg_in_training_is_one_line_naming_it(tmp_path):
    from dptune.data.datamodule import SegmentationDataModule

    root = tmp_path / "d"
    for sub in ("img", "ann"):
        (root / sub).mkdir(parents=True)
    shutil.copy(CAMVID / "labels.yaml", root / "labels.yaml")
    for frame in FRAMES[:2]:
        shutil.copy(frame, root / "img" / frame.name)
        shutil.copy(CAMVID / "valannot" / f"{frame.stem}.png", root / "ann" / f"{frame.stem}.png")
    (root / "img" / "empty.jpg").write_bytes(b"")
    shutil.copy(CAMVID / "valannot" / f"{FRAMES[0].stem}.png", root / "ann" / "empty.png")
    with pytest.raises(DataError, match=r"empty\.jpg: empty file \(0 bytes\)"):
        read_image(str(root / "img" / "empty.jpg"))  # a cv2.error traceback before
    splits = {"train": {"images": "img/*.jpg", "masks": "ann/{stem}.png"}}
    for check in (True, "header"):
        dm = SegmentationDataModule(root=str(root), splits=splits, image_size=64, num_workers=0, check=check)
        with pytest.raises(DataError) as err:
            dm.setup("fit")
        assert [ln for ln in str(err.value).splitlines() if "empty.jpg" in ln][0].endswith("empty file (0 bytes), not an image")


def test_predict_names_each_bad_file_goes_on_and_exits_non_zero_with_the_count(models, tmp_path, capsys):
    """An empty ``.jpg`` stopped predict with a traceback and the rest of the folder was lost; a 1x1
    image (and one 3 pixels tall, which transformers takes for channels first; one 1 pixel tall,
    whose depth lost an axis) aborted it without naming the file."""
    (tmp_path / "in").mkdir()
    shutil.copy(FRAMES[0], tmp_path / "in" / "a.jpg")
    (tmp_path / "in" / "b_empty.jpg").write_bytes(b"")
    (tmp_path / "in" / "c_text.png").write_text("not an image")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tmp_path / "in" / "d_dot.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (3, 5, 3), np.uint8)).save(tmp_path / "in" / "e_strip.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (1, 6, 3), np.uint8)).save(tmp_path / "in" / "e_row.png")
    shutil.copy(FRAMES[1], tmp_path / "in" / "f.jpg")
    for model in ("segmentation", "depth", ""):
        out = tmp_path / f"out-{model or 'joint'}"
        rc = predict_main(["--model", str(models / model), "--images", str(tmp_path / "in"), "--out", str(out),
                           "--device", "cpu"])
        lines = errors(capsys)
        assert rc == 2, model
        assert len(lines) == 3, lines
        assert "b_empty.jpg: empty file" in lines[0] and "c_text.png: not a readable image" in lines[1]
        assert lines[-1].startswith("error: 2 of 7 images could not be predicted")
        for stem, shape in (("a", (360, 480)), ("d_dot", (1, 1)), ("e_strip", (3, 5)), ("e_row", (1, 6)),
                            ("f", (360, 480))):
            if model != "depth":
                assert read_png(out / f"{stem}.png").shape == shape, (model, stem)
            if model != "segmentation":
                assert read_png(out / f"{stem}_depth.tiff").shape == shape, (model, stem)


def test_an_out_folder_that_cannot_be_written_is_one_line_naming_it(models, tmp_path, capsys, monkeypatch):
    """A read-only --out said "error: [Errno 30] Read-only file system: 'OUT/.dptune-predict.json.x.tmp.json'",
    naming a hidden file and not --out."""
    import errno

    from dptune.tools import outputs

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(src))

    (tmp_path / "in").mkdir()
    shutil.copy(FRAMES[0], tmp_path / "in" / "a.jpg")
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(outputs.os, "replace", read_only)
    rc = predict_main(["--model", str(models / "segmentation"), "--images", str(tmp_path / "in"), "--out",
                       str(tmp_path / "out"), "--device", "cpu"])
    lines = errors(capsys)
    assert rc == 2 and lines == [f"error: --out {tmp_path / 'out'}: cannot be written (Read-only file system)"], lines
    # an --out that did not exist is not left behind, empty, by a run that wrote nothing
    new = tmp_path / "new" / "out"
    rc = predict_main(["--model", str(models / "segmentation"), "--images", str(tmp_path / "in"), "--out",
                       str(new), "--device", "cpu"])
    assert rc == 2 and errors(capsys) == [f"error: --out {new}: cannot be written (Read-only file system)"]
    assert not (tmp_path / "new").exists()


def test_a_file_where_a_mirrored_output_folder_must_go_is_named(models, tmp_path, capsys):
    """Inputs from two folders are mirrored below --out; a file in the way of one of those folders said
    only "--out OUT: cannot be written (File exists)", naming no file, and left the folders it made."""
    for sub in ("a", "b"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        shutil.copy(FRAMES[0], tmp_path / "in" / sub / "x.jpg")
    out = tmp_path / "out"
    out.mkdir()
    (out / "b").write_text("the user's notes")
    rc = predict_main(["--model", str(models / "segmentation"), "--images", str(tmp_path / "in" / "*" / "*.jpg"),
                       "--out", str(out), "--device", "cpu"])
    lines = errors(capsys)
    assert rc == 2 and len(lines) == 1 and f"{out / 'b'} is a file where predict needs a folder" in lines[0], lines
    assert sorted(p.name for p in out.iterdir()) == ["b"] and (out / "b").read_text() == "the user's notes"
    (tmp_path / "nowhere").symlink_to(tmp_path / "missing")
    rc = predict_main(["--model", str(models / "segmentation"), "--images", str(FRAMES[0]), "--out",
                       str(tmp_path / "nowhere"), "--device", "cpu"])
    lines = errors(capsys)
    assert rc == 2 and len(lines) == 1 and f"{tmp_path / 'nowhere'} is a link to nothing where" in lines[0], lines


@pytest.mark.parametrize("scales", ["0", "-1", "abc", "nan", "1e9", "", "1,1"])
def test_evaluate_refuses_scales_it_cannot_use_in_one_line_before_loading(tmp_path, capsys, scales):
    """evaluate parsed --scales itself, unchecked: 1e9 was an OverflowError traceback, 0 and -1 said
    "height and width must be > 0", abc "could not convert string to float", none naming the option
    (predict checks them: 0.125 to 4)."""
    model = camvid_model(tmp_path / "model")
    rc = evaluate_main(["--model", str(model), "--root", str(CAMVID), "--images", "val/0016E5_0799*.jpg",
                        "--masks", "valannot/{stem}.png", "--labels", "labels.yaml", "--scales", scales,
                        "--device", "cpu"])
    lines = errors(capsys)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: --scales {scales!r}"), lines


@pytest.mark.parametrize("given", [["--images", "val/0016E5_07959.jpg"], ["--masks", "nowhere/{stem}.png"],
                                   ["--labels", "no-such-labels.yaml"]])
def test_evaluate_with_a_config_refuses_files_the_config_would_replace(tmp_path, capsys, given):
    """``evaluate --config C --split val --images X --masks M --labels L`` scored the config's split with the
    config's labels, exit 0, whatever the three named, files that did not exist included (a user attack)."""
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  root: {CAMVID}\n")
    rc = evaluate_main(["--model", str(tmp_path / "no-model"), "--config", str(config), *given, "--device", "cpu"])
    lines = errors(capsys)
    assert rc == 2 and len(lines) == 1 and f"{given[0]} and --config" in lines[0], lines


@pytest.mark.parametrize("alpha", ["2", "-0.5", "nan"])
def test_predict_refuses_an_overlay_opacity_outside_0_to_1(models, tmp_path, capsys, alpha):
    """--alpha 2 blended with a weight of -1 (uint8 colours wrapped), NaN gave undefined pixels: both
    wrote overlays without a word."""
    rc = predict_main(["--model", str(models / "segmentation"), "--images", str(FRAMES[0]), "--out",
                       str(tmp_path / "out"), "--alpha", alpha, "--device", "cpu"])
    lines = errors(capsys)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: --alpha {float(alpha)}"), lines
    assert not (tmp_path / "out").exists()


# ============================================================================ never write among the inputs
@pytest.mark.parametrize("model", ["segmentation", "depth", ""])
def test_predict_never_writes_into_its_input_folder(models, tmp_path, capsys, model):
    """``--out`` at the image folder wrote masks over PNG images of the same name. Refused in one
    line for every model, as is a folder inside it, an input file, and a folder whose subfolders
    (the inputs' folders mirrored) would be the inputs' own; the inputs stay byte-for-byte as they were."""
    images = tmp_path / "photos"
    images.mkdir()
    for frame in FRAMES[:2]:
        Image.open(frame).save(images / f"{frame.stem}.png")
    (tmp_path / "tree" / "b").mkdir(parents=True)
    (tmp_path / "tree" / "c" / "b").mkdir(parents=True)
    shutil.copy(FRAMES[2], tmp_path / "tree" / "b" / "x.jpg")  # its prediction would go to OUT/b/x.png
    shutil.copy(FRAMES[2], tmp_path / "tree" / "c" / "b" / "y.jpg")
    before = snapshot(tmp_path)
    cases = [(str(images), str(images)), (str(images), str(images / "preds")),
             (str(images / f"{FRAMES[0].stem}.png"), str(images / f"{FRAMES[0].stem}.png")),
             (str(tmp_path / "tree" / "**" / "*.jpg"), str(tmp_path / "tree" / "c"))]  # tree/c/b: an input folder
    for spec, out in cases:
        rc = predict_main(["--model", str(models / model), "--images", spec, "--out", out, "--device", "cpu"])
        lines = errors(capsys)
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: --out"), (spec, out, lines)
        assert "a folder of the inputs" in lines[0] or "is one of the inputs" in lines[0], lines
        assert snapshot(tmp_path) == before, (spec, out)


def test_predict_replaces_its_own_files_and_no_others_unless_told(models, tmp_path, capsys):
    frame = FRAMES[0]
    out = tmp_path / "preds"
    out.mkdir()
    (out / f"{frame.stem}.png").write_bytes(b"my drawing")
    (out / "notes.txt").write_text("mine")
    args = ["--model", str(models / "segmentation"), "--images", str(frame), "--out", str(out), "--device", "cpu"]
    assert predict_main(args) == 2
    lines = errors(capsys)
    assert len(lines) == 1 and "predict did not write" in lines[0] and "--overwrite" in lines[0]
    assert (out / f"{frame.stem}.png").read_bytes() == b"my drawing" and len(list(out.iterdir())) == 2
    assert predict_main([*args, "--overwrite"]) == 0  # the user said so
    assert read_png(out / f"{frame.stem}.png").shape == (360, 480)
    assert predict_main(args) == 0  # the files predict wrote, as it wrote them: a rerun replaces them
    assert read_png(out / f"{frame.stem}_overlay.png").shape[0] == 360
    assert (out / "notes.txt").read_text() == "mine"
    # a mask corrected by hand since is the user's (a rerun replaced it without a word)
    corrected = np.full((360, 480), 2, np.uint8)
    Image.fromarray(corrected).save(out / f"{frame.stem}.png")
    assert predict_main(args) == 2
    lines = errors(capsys)
    assert len(lines) == 1 and "or that changed since" in lines[0] and f"{frame.stem}.png" in lines[0], lines
    assert (read_png(out / f"{frame.stem}.png") == corrected).all()
    # a copy of the folder (cp -r, tar: new times, same content) is still predict's own
    assert predict_main([*args, "--overwrite"]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, copy_function=shutil.copy)
    assert predict_main([*args[:-4], "--out", str(copy), "--device", "cpu"]) == 0
    # a list written before stamps were kept: a file changed after the list was is the user's
    listing = json.loads((copy / "dptune-predict.json").read_text())
    del listing["stamps"]
    (copy / "dptune-predict.json").write_text(json.dumps(listing))
    Image.fromarray(corrected).save(copy / f"{frame.stem}.png")
    assert predict_main([*args[:-4], "--out", str(copy), "--device", "cpu"]) == 2 and "changed since" in errors(capsys)[0]
    # a link of the user's to a file that is not there (a drive not mounted) is the user's too
    assert predict_main([*args, "--overwrite"]) == 0
    (out / f"{frame.stem}_overlay.png").unlink()
    (out / f"{frame.stem}_overlay.png").symlink_to(tmp_path / "unmounted" / "mine.png")
    assert predict_main(args) == 2
    lines = errors(capsys)
    assert len(lines) == 1 and f"(first: {out / frame.stem}_overlay.png)" in lines[0], lines
    assert (out / f"{frame.stem}_overlay.png").is_symlink()
    assert predict_main([*args, "--overwrite"]) == 0


def test_evaluate_never_writes_among_its_inputs_nor_over_other_files(models, tmp_path, capsys):

    data = tmp_path / "data"
    for sub in ("val", "valannot"):
        (data / sub).mkdir(parents=True)
    shutil.copy(CAMVID / "labels.yaml", data / "labels.yaml")
    for frame in FRAMES[:2]:
        shutil.copy(frame, data / "val" / frame.name)
        shutil.copy(CAMVID / "valannot" / f"{frame.stem}.png", data / "valannot" / f"{frame.stem}.png")
    model = camvid_model(tmp_path / "model")
    base = ["--model", str(model), "--images", "val/*.jpg", "--masks", "valannot/{stem}.png", "--labels",
            "labels.yaml", "--root", str(data), "--device", "cpu"]
    before = snapshot(tmp_path)
    for flag, path in (("--json", data / "valannot" / "scores.json"), ("--json", data / "labels.yaml"),
                       ("--confusion", data / "val" / f"{FRAMES[0].stem}.jpg"), ("--json", model / "scores.json"),
                       ("--confusion", data / "valannot" / f"{FRAMES[0].stem}.png")):
        assert evaluate_main([*base, flag, str(path)]) == 2, (flag, path)
        lines = errors(capsys)
        assert len(lines) == 1 and flag in lines[0], lines
        assert snapshot(tmp_path) == before, (flag, path)
    (tmp_path / "report").mkdir()
    mine = tmp_path / "report" / "scores.json"
    mine.write_text('{"my": "notes"}')
    assert evaluate_main([*base, "--json", str(mine)]) == 2 and "--overwrite" in errors(capsys)[0]
    assert mine.read_text() == '{"my": "notes"}'
    outs = ["--json", str(tmp_path / "report" / "s.json"), "--confusion", str(tmp_path / "report" / "cm.png")]
    assert evaluate_main([*base, *outs]) == 0
    assert evaluate_main([*base, *outs]) == 0  # its own files: replaced without asking
    assert json.loads((tmp_path / "report" / "s.json").read_text())["images"] == 2


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_evaluate_of_a_mask_of_another_size_than_its_image_is_one_line_naming_it(tmp_path, capsys, mode):
    """A mask 10 rows short of its image was an IndexError traceback in the scoring loop (the
    prediction is the image's size), naming no file."""

    data = tmp_path / "data"
    short = camvid_subset(data, FRAMES[:2], short=1)
    model = camvid_model(tmp_path / "model")
    rc = evaluate_main(["--model", str(model), "--images", "val/*.jpg", "--masks", "valannot/{stem}.png", "--labels",
                        "labels.yaml", "--root", str(data), "--device", "cpu", "--mode", mode])
    err = capsys.readouterr().err
    lines = [ln.strip() for ln in err.replace("\r", "\n").splitlines() if ln.strip().startswith("error")]
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert lines == [f"error: {short}: mask is 480x350 but its image is 480x360"], lines


def test_inspect_never_writes_its_weights_over_the_config_or_among_the_data(tmp_path, capsys):
    data = tmp_path / "data"
    for sub in ("train", "trainannot"):
        (data / sub).mkdir(parents=True)
    shutil.copy(CAMVID / "labels.yaml", data / "labels.yaml")
    for frame in FRAMES[:2]:
        shutil.copy(frame, data / "train" / frame.name)
        shutil.copy(CAMVID / "valannot" / f"{frame.stem}.png", data / "trainannot" / f"{frame.stem}.png")
    config = tmp_path / "camvid.yaml"
    shutil.copy(REPO / "configs" / "camvid.yaml", config)
    base = [str(config), "--root", str(data), "--splits", "train", "--class-weights", "median"]
    before = snapshot(tmp_path)
    for out in (config, data / "trainannot" / "w.yaml"):
        assert inspect_main([*base, "--out", str(out)]) == 2  # the config was overwritten before
        lines = errors(capsys)
        assert len(lines) == 1 and "--out" in lines[0], lines
        assert snapshot(tmp_path) == before
    (tmp_path / "w.yaml").write_text("# my own notes\n")
    assert inspect_main([*base, "--out", str(tmp_path / "w.yaml")]) == 2 and "--overwrite" in errors(capsys)[0]
    assert (tmp_path / "w.yaml").read_text() == "# my own notes\n"
    assert inspect_main([*base, "--out", str(tmp_path / "w2.yaml")]) == 0
    assert inspect_main([*base, "--out", str(tmp_path / "w2.yaml")]) == 0  # its own fragment: replaced


def test_inspect_weights_on_a_full_disk_are_one_line(tmp_path, capsys, monkeypatch):
    """A full disk at --out ended inspect in a traceback (OSError: [Errno 28]) after the whole scan."""
    import errno

    from dptune.tools import outputs

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(src))

    monkeypatch.setattr(outputs.os, "replace", full)
    config = tmp_path / "camvid.yaml"
    shutil.copy(REPO / "configs" / "camvid.yaml", config)
    rc = inspect_main([str(config), "--root", str(CAMVID), "--splits", "train", "--class-weights", "median", "--out",
                       str(tmp_path / "w.yaml")])
    assert rc == 2 and errors(capsys) == [f"error: --out {tmp_path / 'w.yaml'}: could not be written "
                                          "(No space left on device)"]
    assert list(tmp_path.iterdir()) == [config]


# ============================================================================ code shipped with a model
def test_an_export_asking_for_remote_code_never_prompts_and_says_how_to_allow_it(models, tmp_path, capsys,
                                                                               monkeypatch):
    """transformers asks "Do you wish to run the custom code? [y/N]" at the terminal when a config's
    ``auto_map`` names code and ``trust_remote_code`` is not given: dptune passes it, False unless
    ``--trust-remote-code``."""
    import builtins

    import transformers.dynamic_module_utils as dynamic

    from dptune.inference.predictor import Predictor

    model = tmp_path / "custom"
    shutil.copytree(models / "segmentation", model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="dptune-test-custom", auto_map={"AutoConfig": "custom_dpt.CustomDPTConfig"})
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "custom_dpt.py").write_text("from transformers import DPTConfig\n\n\nclass CustomDPTConfig(DPTConfig):\n"
                                         "    model_type = 'dptune-test-custom'\n")
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "n")
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    frame = str(FRAMES[0])
    with pytest.raises(ConfigError, match="--trust-remote-code"):
        Predictor.load(str(model))
    assert predict_main(["--model", str(model), "--images", frame, "--out", str(tmp_path / "p"), "--device", "cpu"]) == 2
    lines = errors(capsys)
    assert len(lines) == 1 and "--trust-remote-code" in lines[0]
    assert evaluate_main(["--model", str(model), "--images", frame, "--masks", str(CAMVID / "valannot" / "{stem}.png"),
                          "--labels", str(CAMVID / "labels.yaml"), "--device", "cpu"]) == 2
    assert "--trust-remote-code" in errors(capsys)[0]
    assert asked == []
    assert predict_main(["--model", str(model), "--images", frame, "--out", str(tmp_path / "p"), "--device", "cpu",
                         "--trust-remote-code"]) == 0
    assert asked == [] and read_png(tmp_path / "p" / f"{FRAMES[0].stem}.png").shape == (360, 480)


def test_a_disk_cache_entry_decoded_before_exif_orientation_is_not_served(tmp_path):
    """An entry written by the EXIF-blind reader (keyed without a decoder version) must miss:
    serving it would train on the stored, unturned pixels while predict reads them upright."""
    from dptune.data.cache import DiskCache, _stamp
    from dptune.data.sources import FolderSource
    from dptune.labels import load_labels

    labels = load_labels("labels.yaml", str(CAMVID))
    source = FolderSource(str(CAMVID), "val/0016E5_07997.jpg", "valannot/{stem}.png")
    cache = DiskCache(source, labels, tmp_path / "cache")
    old = f"{_stamp(source.images[0])}|{_stamp(source.masks[0])}|" + hashlib.sha1(
        json.dumps(labels.to_dict(), sort_keys=True).encode()).hexdigest()
    key = hashlib.sha1(old.encode()).hexdigest()
    base = tmp_path / "cache" / key[:2] / key
    base.parent.mkdir(parents=True)
    np.save(base.with_suffix(".image.npy"), np.zeros((4, 4, 3), np.uint8))
    np.save(base.with_suffix(".mask.npy"), np.zeros((4, 4), np.uint8))
    assert 0 not in cache


def test_a_disk_cache_entry_written_before_the_mask_checks_is_not_served(tmp_path, monkeypatch):
    """The data check takes a cached sample as checked: masks the reader now refuses (JPEG-coded, 16-bit
    colour channels, labels under transparency), cached by the reader before, trained on as they were read
    (a review). The decoder version in the key moved on with the reader."""
    from dptune.data import cache as disk
    from dptune.data.sources import FolderSource
    from dptune.labels import load_labels

    labels = load_labels("labels.yaml", str(CAMVID))
    source = FolderSource(str(CAMVID), "val/0016E5_07997.jpg", "valannot/{stem}.png")
    monkeypatch.setattr(disk, "DECODER", 2)  # the reader before the mask checks
    disk.DiskCache(source, labels, tmp_path / "cache").put(0, np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8))
    assert 0 in disk.DiskCache(source, labels, tmp_path / "cache")
    monkeypatch.undo()
    assert 0 not in disk.DiskCache(source, labels, tmp_path / "cache")


@pytest.mark.parametrize("where", ["export", "checkpoint"])
def test_predict_never_writes_into_the_models_folder(models, tmp_path, capsys, where):
    """``--out`` at (or inside) an exported model, or in the folder of the checkpoint predicted with,
    would mix masks into the model (and a later export --overwrite there would delete them)."""
    images = tmp_path / "photos"
    images.mkdir()
    shutil.copy(FRAMES[0], images / "a.jpg")
    model = tmp_path / "model"
    shutil.copytree(models / "segmentation", model)
    if where == "checkpoint":
        model = tmp_path / "run" / "checkpoints" / "last.ckpt"
        model.parent.mkdir(parents=True)
        model.write_bytes(b"never read: the output is refused first")
    before = snapshot(tmp_path)
    # an export: the folder and anything in it; a checkpoint: its folder (a folder beside it is fine)
    for out in ((model, model / "p") if where == "export" else (model.parent,)):
        rc = predict_main(["--model", str(model), "--images", str(images / "*.jpg"), "--out", str(out),
                           "--device", "cpu"])
        lines = errors(capsys)
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: --out"), lines
        assert snapshot(tmp_path) == before


# ============================================================================ outputs replace, never write through
def linked_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """``imgs/`` (two PNG frames, as phones and exports store them) and ``out/``, whose entries at
    the names predict writes are links to those images: hard links and symbolic ones."""
    images, out = tmp_path / "imgs", tmp_path / "out"
    images.mkdir()
    out.mkdir()
    for frame in FRAMES[:2]:
        Image.open(frame).save(images / f"{frame.stem}.png")
    return images, out


@pytest.mark.parametrize("model", ["segmentation", "depth", ""])
def test_predict_overwrite_replaces_links_in_out_never_writes_through_them(models, tmp_path, model):
    """``out/x.png`` hard-linked (or symlinked) to ``imgs/x.png``: ``--overwrite`` wrote the mask
    into the input image's inode. Every file predict writes replaces its directory entry."""
    images, out = linked_inputs(tmp_path)
    a, b = (f"{f.stem}" for f in FRAMES[:2])
    for i, name in enumerate([f"{a}.png", f"{a}_overlay.png", f"{a}_depth_color.png", f"{b}.png",
                              f"{b}_depth_color.png", f"{b}_overlay.png"]):
        target = images / (f"{a}.png" if i % 2 == 0 else f"{b}.png")
        if i < 3:
            (out / name).hardlink_to(target)
        else:
            (out / name).symlink_to(target)
    before = snapshot(images)
    args = ["--model", str(models / model), "--images", str(images), "--out", str(out), "--device", "cpu",
            "--overwrite", *(["--intrinsics", "500,500,240,180"] if model != "segmentation" else [])]
    assert predict_main(args) == 0
    assert snapshot(images) == before  # the inputs, byte for byte
    written = [out / f for f in json.loads((out / "dptune-predict.json").read_text())["files"]]
    assert len(written) >= 4 and not [p for p in written if p.is_symlink() or p.stat().st_nlink > 1]
    if model != "depth":
        assert read_png(out / f"{a}.png").ndim == 2  # the mask now, not the image
    assert not list(out.glob(".*tmp*"))  # no temporary file left behind


def test_evaluate_and_inspect_overwrite_replace_a_hard_link_to_an_input(models, tmp_path, capsys):
    """``--json``/``--confusion``/``--out`` at a hard link to a data file: ``--overwrite`` replaced
    the link, and the file it shared its content with (a mask, the label file) stays as it was."""
    from dptune.labels import LabelSet
    from dptune.tasks.segmentation import SegmentationModule

    data = tmp_path / "data"
    for sub in ("train", "trainannot"):
        (data / sub).mkdir(parents=True)
    shutil.copy(CAMVID / "labels.yaml", data / "labels.yaml")
    for frame in FRAMES[:2]:
        shutil.copy(frame, data / "train" / frame.name)
        shutil.copy(CAMVID / "valannot" / f"{frame.stem}.png", data / "trainannot" / f"{frame.stem}.png")
    model = tmp_path / "model"
    m = SegmentationModule(config=dict(TINY), label_spec=LabelSet.from_yaml(CAMVID / "labels.yaml").to_dict(),
                           image_size=64).eval()
    m.model.save_pretrained(model)
    m.image_processor().save_pretrained(model)
    report = tmp_path / "report"
    report.mkdir()
    mask = data / "trainannot" / f"{FRAMES[0].stem}.png"
    (report / "s.json").hardlink_to(data / "labels.yaml")
    (report / "cm.png").hardlink_to(mask)
    (report / "w.yaml").hardlink_to(data / "labels.yaml")
    before = snapshot(data)
    assert evaluate_main(["--model", str(model), "--images", "train/*.jpg", "--masks", "trainannot/{stem}.png",
                          "--labels", "labels.yaml", "--root", str(data), "--device", "cpu", "--overwrite",
                          "--json", str(report / "s.json"), "--confusion", str(report / "cm.png")]) == 0
    config = tmp_path / "camvid.yaml"
    shutil.copy(REPO / "configs" / "camvid.yaml", config)
    assert inspect_main([str(config), "--root", str(data), "--splits", "train", "--class-weights", "median",
                         "--out", str(report / "w.yaml"), "--overwrite"]) == 0
    assert snapshot(data) == before
    assert json.loads((report / "s.json").read_text())["images"] == 2
    assert "class_weights" in (report / "w.yaml").read_text()
    assert all(p.stat().st_nlink == 1 for p in report.iterdir())


# ============================================================================ files a config names are inputs
def test_the_label_file_a_config_names_is_an_input_with_or_without_overwrite(models, tmp_path, capsys):
    """``evaluate --config C --json ROOT/labels.yaml --overwrite`` replaced the label file the config
    names (``data.labels``, relative to the root); inspect's ``--out`` too. It is one of the inputs,
    and the refusal does not offer ``--overwrite``."""
    from dptune.labels import LabelSet
    from dptune.tasks.segmentation import SegmentationModule

    data = tmp_path / "data"
    for sub in ("train", "trainannot"):
        (data / sub).mkdir(parents=True)
    shutil.copy(CAMVID / "labels.yaml", data / "mylabels.yaml")
    for frame in FRAMES[:2]:
        shutil.copy(frame, data / "train" / frame.name)
        shutil.copy(CAMVID / "valannot" / f"{frame.stem}.png", data / "trainannot" / f"{frame.stem}.png")
    config = tmp_path / "cfg" / "c.yaml"
    config.parent.mkdir()
    config.write_text("data:\n  root: ../data\n  labels: mylabels.yaml\n  splits:\n"
                      "    train: {images: 'train/*.jpg', masks: 'trainannot/{stem}.png'}\n")
    model = tmp_path / "model"
    m = SegmentationModule(config=dict(TINY), label_spec=LabelSet.from_yaml(CAMVID / "labels.yaml").to_dict(),
                           image_size=64).eval()
    m.model.save_pretrained(model)
    m.image_processor().save_pretrained(model)
    before = snapshot(tmp_path)
    for overwrite in ([], ["--overwrite"]):
        rc = evaluate_main(["--model", str(model), "--config", str(config), "--root", str(data), "--split", "train",
                            "--device", "cpu", "--json", str(data / "mylabels.yaml"), *overwrite])
        lines = errors(capsys)
        assert rc == 2 and len(lines) == 1 and "is one of the inputs" in lines[0] and "--overwrite" not in lines[0]
        assert snapshot(tmp_path) == before
        rc = inspect_main([str(config), "--root", str(data), "--splits", "train", "--class-weights", "median",
                           "--out", str(data / "mylabels.yaml"), *overwrite])
        lines = errors(capsys)
        assert rc == 2 and len(lines) == 1 and "is one of the inputs" in lines[0] and "--overwrite" not in lines[0]
        assert snapshot(tmp_path) == before


# ============================================================================ JPEGs with a trailer, truncated ones
def motion_photo(frame: Path) -> bytes:
    """A JPEG as Google's and Samsung's Motion Photos store it: the picture, then an MP4 after its
    end-of-image marker (random bytes, end markers among them, stand in for the video)."""
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, 20000, np.uint8).tobytes() + b"\xff\xd9" + rng.integers(0, 256, 999, np.uint8).tobytes()
    return frame.read_bytes() + b"\x00\x00\x00\x18ftypmp42" + video


def with_exif_thumbnail(frame: Path) -> bytes:
    """The frame's JPEG with an EXIF block (APP1) holding a thumbnail: a JPEG of its own, whose
    end-of-image marker lies in the header of the file."""
    import io
    import struct

    buf = io.BytesIO()
    Image.open(frame).resize((60, 45)).save(buf, "JPEG")
    thumb = buf.getvalue()
    ifd1 = 8 + 2 + 12 + 4
    tiff = (b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 3, 1, 1)
            + struct.pack("<I", ifd1) + struct.pack("<H", 2)
            + struct.pack("<HHII", 0x0201, 4, 1, ifd1 + 2 + 24 + 4) + struct.pack("<HHII", 0x0202, 4, 1, len(thumb))
            + struct.pack("<I", 0) + thumb)
    app1 = b"Exif\x00\x00" + tiff
    data = frame.read_bytes()
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def test_a_jpeg_with_data_after_its_end_marker_is_read_and_a_cut_one_is_one_line(models, tmp_path, capsys):
    """A Motion Photo (a JPEG, then its MP4) was refused as "truncated JPEG" in training and
    predict, though every reader takes its picture; a JPEG cut in its compressed data, whose EXIF
    thumbnail's end marker lies in its header, is still one line naming it."""
    from dptune.data.datamodule import SegmentationDataModule

    root = tmp_path / "d"
    for sub in ("img", "ann"):
        (root / sub).mkdir(parents=True)
    shutil.copy(CAMVID / "labels.yaml", root / "labels.yaml")
    (root / "img" / "motion.jpg").write_bytes(motion_photo(FRAMES[0]))
    shutil.copy(CAMVID / "valannot" / f"{FRAMES[0].stem}.png", root / "ann" / "motion.png")
    thumbed = with_exif_thumbnail(FRAMES[1])
    assert read_image_bytes(tmp_path, thumbed).shape == (360, 480, 3)  # the whole file with its thumbnail reads
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(thumbed[: len(thumbed) * 2 // 3])
    for read, size in ((read_image, lambda a: a.shape[:2]), (image_header_size, tuple)):
        assert size(read(str(root / "img" / "motion.jpg"))) == (360, 480)
        with pytest.raises(DataError, match=r"cut\.jpg: truncated JPEG"):
            read(str(cut))
    motion = read_image(str(root / "img" / "motion.jpg"))
    assert np.array_equal(motion, np.asarray(Image.open(root / "img" / "motion.jpg").convert("RGB")))  # as PIL reads it
    assert np.abs(motion.astype(int) - np.asarray(Image.open(FRAMES[0]).convert("RGB"))).max() <= 1
    splits = {"train": {"images": "img/*.jpg", "masks": "ann/{stem}.png"}}
    for check in (True, "header"):
        dm = SegmentationDataModule(root=str(root), splits=splits, image_size=64, num_workers=0, check=check)
        dm.setup("fit")  # "truncated JPEG (no end-of-image marker)" before
        assert len(dm.datasets["train"]) == 1
    shutil.copy(cut, root / "img" / "cut.jpg")
    assert predict_main(["--model", str(models / "segmentation"), "--images", str(root / "img"), "--out",
                         str(tmp_path / "out"), "--device", "cpu"]) == 2
    lines = errors(capsys)
    assert len(lines) == 2 and "cut.jpg: truncated JPEG" in lines[0], lines
    assert read_png(tmp_path / "out" / "motion.png").shape == (360, 480)


def read_image_bytes(tmp_path: Path, data: bytes) -> np.ndarray:
    path = tmp_path / "whole.jpg"
    path.write_bytes(data)
    assert image_header_size(str(path)) == (360, 480)
    return read_image(str(path))


# ============================================================================ other spellings of an extension
def test_jpeg_files_beside_a_jpg_glob_are_counted_in_a_warning_never_dropped_silently(tmp_path, caplog):
    """``*.jpg`` takes ``.JPG`` but left ``.jpeg``/``.Jpeg`` files in the same folders out without a
    word (training, validation, inspect, predict): one warning per glob with the count, an example
    and a glob that takes them, which does (upper case too)."""
    import logging

    from dptune.data.globs import glob_files
    from dptune.tools.inputs import list_images

    root = tmp_path / "d"
    (root / "train").mkdir(parents=True)
    for i, ext in enumerate(["jpg", "JPG", "jpg", "jpeg", "Jpeg", "JPEG", "png"]):
        shutil.copy(FRAMES[i % len(FRAMES)], root / "train" / f"f{i}.{ext}")
    with caplog.at_level(logging.WARNING):
        assert len(FolderSource(str(root), "train/*.jpg", "ann/{stem}.png")) == 3
        assert len(FolderSource(str(root), "train/*.jpg", "ann/{stem}.png")) == 3  # the same split again
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    assert warned[0].startswith("3 image file(s) in the folders of 'train/*.jpg' do not match it (e.g. f3.jpeg)")
    assert "'train/*.jp*g'" in warned[0]
    assert len(FolderSource(str(root), "train/*.jp*g", "ann/{stem}.png")) == 6  # the glob it offers takes all six
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert len(list_images(str(root / "train" / "f*.jpg"))) == 3  # predict --images GLOB
    assert any("3 image file(s)" in r.getMessage() for r in caplog.records)
    (tmp_path / "only").mkdir()
    shutil.copy(FRAMES[0], tmp_path / "only" / "a.jpeg")
    with pytest.raises(DataError, match=r"no images match; 1 image file\(s\) .* \(e\.g\. a\.jpeg\)"):
        FolderSource(str(tmp_path), "only/*.jpg", "ann/{stem}.png")
    assert glob_files(str(tmp_path / "only" / "*.jpg")) == []



def test_a_folder_of_inputs_reads_every_image_type_and_names_what_it_leaves(tmp_path, caplog):
    """predict --images FOLDER left GIF files out (the reader decodes them; a file path or glob read
    them) and skipped other files and sub-folders without a word: a GIF is read, and one warning
    counts what is not, with the glob that searches sub-folders."""
    import logging

    from dptune.tools.inputs import list_images

    Image.open(FRAMES[0]).save(tmp_path / "a.gif")
    shutil.copy(FRAMES[1], tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    shutil.copy(FRAMES[2], tmp_path / "sub" / "c.png")
    with caplog.at_level(logging.WARNING):
        found = list_images(str(tmp_path))
    assert [Path(f).name for f in found] == ["a.gif", "b.png"]
    assert read_image(found[0]).shape == read_image(str(FRAMES[0])).shape
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "2 entries" in warned[0] and "notes.txt" in warned[0] and "sub/" in warned[0], warned
    assert f"'{tmp_path}/**/*'" in warned[0], warned
    (tmp_path / "a.gif").unlink()
    (tmp_path / "b.png").unlink()
    with pytest.raises(DataError, match=r"no images found in .*: 2 entries, none an image \(notes\.txt, sub/\)"):
        list_images(str(tmp_path))


def test_a_large_folder_of_inputs_lists_in_one_pass_and_names_odd_entries_on_one_line(tmp_path, caplog):
    """Listing a folder checked each entry against a list of the images found: 60,000 names took
    30-48 s (20,000: 3.3 s). And the warning split over lines at a name holding a newline, and
    listed a broken link among "not read as images" without saying it was broken."""
    import logging
    import time

    from dptune.tools.inputs import list_images

    big = tmp_path / "big"
    big.mkdir()
    for i in range(40_000):
        (big / f"{i:05d}.png").touch()
    start = time.perf_counter()
    assert len(list_images(str(big))) == 40_000
    assert time.perf_counter() - start < 5, "listing 40,000 images took longer than a pass over them should"
    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(FRAMES[0], odd / "a.jpg")
    (odd / "x\ny.txt").write_text("mine")
    (odd / "gone.png").symlink_to(odd / "nowhere.png")
    with caplog.at_level(logging.WARNING):
        assert [Path(f).name for f in list_images(str(odd))] == ["a.jpg"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "\n" not in warned[0], warned
    assert "gone.png (a broken link)" in warned[0] and "x\\ny.txt" in warned[0], warned

# ============================================================================ a mask's own EXIF tag
def test_a_mask_turned_by_its_own_stray_exif_tag_is_one_line_that_names_the_tag(tmp_path):
    from dptune.data.datamodule import SegmentationDataModule

    root = tmp_path / "d"
    for sub in ("img", "ann"):
        (root / sub).mkdir(parents=True)
    shutil.copy(CAMVID / "labels.yaml", root / "labels.yaml")
    shutil.copy(FRAMES[0], root / "img" / "x.jpg")  # upright, no tag
    Image.open(CAMVID / "valannot" / f"{FRAMES[0].stem}.png").save(root / "ann" / "x.png", exif=exif(6))
    splits = {"train": {"images": "img/*.jpg", "masks": "ann/{stem}.png"}}
    for check in (True, "header"):
        dm = SegmentationDataModule(root=str(root), splits=splits, image_size=64, num_workers=0, check=check)
        with pytest.raises(DataError) as err:
            dm.setup("fit")
        line = [ln for ln in str(err.value).splitlines() if "x.png" in ln][0]
        assert "mask is 360x480" in line and "its image is 480x360" in line and "EXIF orientation (6)" in line, line


# ============================================================================ predict: no images, other models, the manifest
def test_predict_of_a_folder_without_images_is_one_line_and_makes_no_out(models, tmp_path, capsys):
    """A folder holding no images predicted "0 predictions", exit 0, and made an empty --out."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not an image")
    for folder, held in (("empty", " (an empty folder)"), ("notes", ": 1 entry, none an image (a.txt)")):
        out = tmp_path / f"preds-{folder}"
        rc = predict_main(["--model", str(models / "segmentation"), "--images", str(tmp_path / folder),
                           "--out", str(out), "--device", "cpu"])
        lines = errors(capsys)
        assert rc == 2 and lines == [f"error: no images found in {tmp_path / folder}{held}"], lines
        assert not out.exists()


@pytest.mark.parametrize("kind", ["export", "joint", "card", "checkpoint"])
def test_predict_never_writes_into_another_models_folder(models, tmp_path, capsys, kind):
    """``--out out/camvid`` while predicting with out/quickstart put masks and a manifest into the
    CamVid export (a later ``export --overwrite`` there was then refused). Any dptune export (and
    anything inside it) or checkpoint folder is refused as the model's own is."""
    other = tmp_path / "other"
    if kind == "export":
        shutil.copytree(models / "segmentation", other)
    elif kind == "joint":
        shutil.copytree(models, other)
    elif kind == "card":
        other.mkdir()
        (other / "dptune.json").write_text("{}")
    else:
        other.mkdir()
        (other / "last.ckpt").write_bytes(b"a run's checkpoint")
    before = snapshot(tmp_path)
    # an export: the folder and anything in it; a checkpoint's folder (a folder beside a checkpoint is fine)
    outs = (other,) if kind == "checkpoint" else (other, other / "preds")
    for out in outs + ((other / "segmentation",) if kind == "joint" else ()):
        rc = predict_main(["--model", str(models / "segmentation"), "--images", str(FRAMES[0]), "--out", str(out),
                           "--device", "cpu"])
        lines = errors(capsys)
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: --out {out}: is"), lines
        assert str(other) in lines[0]
        assert snapshot(tmp_path) == before


def test_predict_into_its_own_models_folder_says_it_is_the_model(models, tmp_path, capsys):
    """``--out MODEL/preds`` was refused as "inside MODEL, a folder of the inputs": the model is no input folder."""
    model = tmp_path / "model"
    shutil.copytree(models / "segmentation", model)
    before = snapshot(tmp_path)
    for out in (model, model / "preds"):
        rc = predict_main(["--model", str(model), "--images", str(FRAMES[0]), "--out", str(out), "--device", "cpu"])
        lines = errors(capsys)
        assert rc == 2 and len(lines) == 1 and f"the folder of the model {model}" in lines[0], lines
        assert "folder of the inputs" not in lines[0], lines
    assert snapshot(tmp_path) == before


def test_predict_lists_only_the_files_it_wrote(models, tmp_path, capsys):
    """After a run where an input failed, dptune-predict.json listed the failed input's planned
    names; a later run would then replace a user's file of such a name as its own."""
    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(FRAMES[0], images / "a.jpg")
    (images / "broken.jpg").write_bytes(b"")
    out = tmp_path / "preds"
    args = ["--model", str(models / "segmentation"), "--images", str(images), "--out", str(out), "--device", "cpu"]
    assert predict_main(args) == 2
    errors(capsys)
    listed = json.loads((out / "dptune-predict.json").read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in out.iterdir() if p.name != "dptune-predict.json"), listed
    assert "broken.png" not in listed and "a.png" in listed
    (out / "broken.png").write_bytes(b"the user's own")  # a file of the failed input's name, not predict's
    (images / "broken.jpg").unlink()
    shutil.copy(FRAMES[1], images / "broken.jpg")
    assert predict_main(args) == 2  # stopped: broken.png is not predict's to replace
    assert "predict did not write" in errors(capsys)[0]
    assert (out / "broken.png").read_bytes() == b"the user's own"


def test_predict_with_a_folder_that_is_no_model_is_one_line(tmp_path, capsys):
    """``--model <empty folder>`` printed a raw ``[Errno 2] ... config.json``."""
    (tmp_path / "adir").mkdir()
    rc = predict_main(["--model", str(tmp_path / "adir"), "--images", str(FRAMES[0]), "--out", str(tmp_path / "p"),
                       "--device", "cpu"])
    lines = errors(capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: --model {tmp_path / 'adir'}: ") and "config.json" in lines[0]
    assert "Errno" not in lines[0] and not (tmp_path / "p").exists()


@pytest.mark.parametrize("scales", ["0,1", "0,abc", "", "nan", "1,1", "0.5,1,0.50"])
def test_bad_scales_name_the_option(models, tmp_path, capsys, scales):
    """A scale given twice (1,1) ran the same view twice and averaged it with itself, without a word."""
    rc = predict_main(["--model", str(models / "segmentation"), "--images", str(FRAMES[0]),
                       "--out", str(tmp_path / "p"), "--scales", scales, "--device", "cpu"])
    lines = errors(capsys)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: --scales {scales!r}"), lines


@pytest.mark.parametrize("part", ["segmentation", "depth"])
def test_predict_and_evaluate_of_a_damaged_export_are_one_line_naming_the_file(models, tmp_path, capsys, part):
    """A truncated model.safetensors was safetensors' traceback in predict (export already said it)."""
    broken = tmp_path / part
    shutil.copytree(models / part, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    rc = predict_main(["--model", str(broken), "--images", str(FRAMES[0]), "--out", str(tmp_path / "out"),
                       "--device", "cpu"])
    lines = errors(capsys)
    assert rc == 2 and len(lines) == 1 and str(weights) in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_an_interrupted_predict_says_in_its_list_that_it_is_incomplete(models, tmp_path, monkeypatch, capsys):
    """A Ctrl-C part way left a folder of N of M predictions whose dptune-predict.json read like a
    finished run's (adversarial review): the list now says inputs, inputs done and complete."""
    from dptune.tools import predict_run

    images = tmp_path / "in"
    images.mkdir()
    for i in range(3):
        shutil.copy(FRAMES[i], images / f"f{i}.jpg")
    shutil.copy(FRAMES[0], images / "f3.jpg")
    (images / "f4.jpg").write_bytes(b"")  # named as failed: done, not predicted
    out = tmp_path / "preds"
    args = ["--model", str(models / "segmentation"), "--images", str(images), "--out", str(out), "--device", "cpu"]
    assert predict_main(args) == 2
    errors(capsys)
    spec = json.loads((out / "dptune-predict.json").read_text())
    assert (spec["inputs"], spec["inputs_done"], spec["complete"]) == (5, 5, True)

    real, seen = predict_run.read_image, []

    def interrupted(path):
        seen.append(path)
        if len(seen) == 1:  # from the start, the list says a run is under way (a SIGKILL skips every later save)
            start = json.loads((out2 / "dptune-predict.json").read_text())
            assert (start["inputs"], start["inputs_done"], start["complete"]) == (5, 0, False), start
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(predict_run, "read_image", interrupted)
    out2 = tmp_path / "preds2"
    with pytest.raises(KeyboardInterrupt):
        predict_main([*args[:-3], str(out2), "--device", "cpu"])
    spec = json.loads((out2 / "dptune-predict.json").read_text())
    assert (spec["inputs"], spec["inputs_done"], spec["complete"]) == (5, 2, False)
    assert sorted(spec["files"]) == sorted(p.name for p in out2.iterdir() if p.name != "dptune-predict.json")


@needs(KITCHEN)
def test_depth_labels_given_to_a_segmentation_model_say_what_the_model_is(models, capsys):
    """`evaluate --model SEG --images ... --depth ...` said "give --config (and --split), or --images,
    --masks and --labels", which reads as if the depth flags were not seen."""
    seg = models / "segmentation"
    args = ["--model", str(seg), "--images", str(KITCHEN / "val" / "rgb" / "*.jpg"),
            "--depth", str(KITCHEN / "val" / "depth" / "{stem}.png"), "--depth-scale", "1000"]
    assert evaluate_main(args) == 2
    (line,) = errors(capsys)
    assert "--depth" in line and str(seg) in line and "segmentation model" in line and "--masks" in line
    assert evaluate_main([*args, "--config", str(REPO / "configs" / "quickstart.yaml")]) == 2
    (line,) = errors(capsys)
    assert "segmentation model" in line and "leave out --depth" in line, line


@needs(KITCHEN)
def test_labels_for_the_part_a_model_lacks_are_refused_not_passed_over(models, capsys):
    """A segmentation model given --masks and --depth scored the masks and never read --depth (exit
    0); a depth model given --masks scored depth without a word about them; a joint model given both
    scored depth only."""
    images = str(CAMVID / "val" / "*.jpg")
    masks = ["--masks", str(CAMVID / "valannot" / "{stem}.png"), "--labels", str(CAMVID / "labels.yaml")]
    depth = ["--depth", str(KITCHEN / "val" / "depth" / "{stem}.png")]
    for model, extra, said in ((models / "segmentation", [*masks, *depth], "leave out --depth"),
                               (models / "depth", [*masks, *depth], "leave out --masks"),
                               (models / "depth", masks, "--depth"),
                               (models, [*masks, *depth], "--part")):
        assert evaluate_main(["--model", str(model), "--images", images, *extra]) == 2, (model, extra)
        (line,) = errors(capsys)
        assert said in line and str(model) in line, line


@needs(KITCHEN)
def test_a_part_asked_for_without_its_labels_is_refused(models, capsys):
    """`--part depth` with masks only scored segmentation (the part's labels missing, the other's used)."""
    images = str(CAMVID / "val" / "*.jpg")
    masks = ["--masks", str(CAMVID / "valannot" / "{stem}.png"), "--labels", str(CAMVID / "labels.yaml")]
    depth = ["--depth", str(KITCHEN / "val" / "depth" / "{stem}.png")]
    for model, extra, said in ((models, ["--part", "depth", *masks], "--part depth"),
                               (models, ["--part", "segmentation", *depth], "--part segmentation"),
                               (models / "segmentation", ["--part", "depth", *depth], "--part depth")):
        assert evaluate_main(["--model", str(model), "--images", images, *extra]) == 2, (model, extra)
        (line,) = errors(capsys)
        assert said in line and str(model) in line, line


def test_a_disk_that_refuses_writes_stops_predict_with_the_reason(models, tmp_path):
    """A full disk (here: the OS's file size limit, a real refusal of the write) gave "libpng error:
    Write Error" and "OUT/a_overlay.png: could not be written" for every input in turn, without a
    reason; the disk is named once with its reason and predict stops."""
    (tmp_path / "in").mkdir()
    for frame in FRAMES:
        shutil.copy(frame, tmp_path / "in" / frame.name)
    script = tmp_path / "limited.py"
    script.write_text("import resource, signal, sys\n"
                      "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead\n"
                      "resource.setrlimit(resource.RLIMIT_FSIZE, (32768, resource.RLIM_INFINITY))\n"
                      "from dptune.tools.predict import main\n"
                      "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "out"
    proc = run_python(script, ["--model", models / "segmentation", "--images", tmp_path / "in", "--out", out,
                               "--device", "cpu"], cwd=tmp_path)
    lines = [ln.strip() for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip().startswith("error")]
    overlay = out / f"{FRAMES[0].stem}_overlay.png"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "libpng" not in proc.stderr, proc.stderr
    assert lines == [f"error: {tmp_path / 'in' / FRAMES[0].name}: {overlay}: cannot be written (File too large)",
                     f"error: stopped at {tmp_path / 'in' / FRAMES[0].name}: {out} cannot be written (File too large); "
                     f"0 of {len(FRAMES)} images predicted"], proc.stderr


def test_an_export_whose_weights_do_not_fit_its_config_is_one_line_never_run_at_random(tmp_path, capsys):
    """A model.safetensors without the head's weights was scored with transformers' fresh random head
    (a LOAD REPORT, then a different mIoU each run, exit 0); an id2label cut to fewer classes than the
    weights ended in transformers' traceback."""
    from safetensors.torch import load_file, save_file

    base = ["--config", str(REPO / "configs" / "camvid.yaml"), "--root", str(CAMVID), "--split", "val"]
    lacking = camvid_model(tmp_path / "lacking")
    weights = load_file(lacking / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("head.head.4")}, lacking / "model.safetensors",
              metadata={"format": "pt"})
    cut = camvid_model(tmp_path / "cut")
    config = json.loads((cut / "config.json").read_text())
    config["id2label"] = {str(i): config["id2label"][str(i)] for i in range(5)}
    config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}
    (cut / "config.json").write_text(json.dumps(config))
    for model, said in ((lacking, "the weights file lacks 2 of the model's weights (head.head.4.bias, head.head.4.weight)"),
                        (cut, "config.json and the weights do not fit each other (auxiliary_head.head.4.bias is "
                              "(11,) in the weights, (5,) by config.json and 3 more)")):
        rc = evaluate_main(["--model", str(model), *base])
        captured = capsys.readouterr().err
        lines = [ln.strip() for ln in captured.splitlines() if ln.strip().startswith("error")]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {model}: {said}"), lines
        assert "LOAD REPORT" not in captured and "MISSING" not in captured, captured
    # a config.json of another kind of model (model_type bert) was loaded as a DPT without a word
    foreign = camvid_model(tmp_path / "foreign")
    config = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    rc = evaluate_main(["--model", str(foreign), *base])
    lines = [ln.strip() for ln in capsys.readouterr().err.splitlines() if ln.strip().startswith("error")]
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {foreign}: config.json says model_type 'bert'") and "not a DPT" in lines[0], lines
    # what prediction never uses may be left out of an export trimmed for serving
    trimmed = camvid_model(tmp_path / "trimmed")
    weights = load_file(trimmed / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("auxiliary_head.")
               and not k.endswith("num_batches_tracked")}, trimmed / "model.safetensors", metadata={"format": "pt"})
    assert evaluate_main(["--model", str(trimmed), *base]) == 0


def camvid_copy(root: Path, frames: list[Path], fill: int | None = None) -> Path:
    """CamVid's labels and ``frames`` (with their masks, or masks of one value ``fill``) as a train and a val split."""
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for frame in frames:
            shutil.copy(frame, root / split / frame.name)
            mask = read_png(CAMVID / "valannot" / f"{frame.stem}.png")
            Image.fromarray(mask if fill is None else np.full_like(mask, fill)).save(
                root / f"{split}annot" / f"{frame.stem}.png")
    shutil.copy(CAMVID / "labels.yaml", root / "labels.yaml")
    return root


def test_evaluate_and_inspect_refuse_what_they_cannot_score_or_write_before_the_work(tmp_path, capsys):
    """Found by a user attack: masks with no labelled pixel scored NaN with exit 0 (and a --json with a
    bare NaN, which is no JSON); class weights of such a split were NaN or all 0 and written; --splits
    foo printed nothing, exit 0; --json and --confusion at one path kept only the picture; a
    --confusion of another extension or a folder that takes no file failed after the whole scoring; a
    named pipe as --json or --out hung the command (it read the file to see whether it was its own)."""
    import os

    config = str(REPO / "configs" / "camvid.yaml")
    model = camvid_model(tmp_path / "model")
    empty = camvid_copy(tmp_path / "empty", FRAMES[:2], fill=11)
    some = camvid_copy(tmp_path / "some", FRAMES[:2])
    os.mkfifo(tmp_path / "pipe.json")

    def evaluate(root: Path, *extra: str) -> list[str]:
        assert evaluate_main(["--model", str(model), "--config", config, "--root", str(root), *extra]) == 2
        lines = errors(capsys)
        assert len(lines) == 1, lines
        return lines[0]

    def inspect(root: Path, *extra: str) -> list[str]:
        assert inspect_main([config, "--root", str(root), *extra]) == 2
        lines = errors(capsys)
        assert len(lines) == 1, lines
        return lines[0]

    assert "masks have no labelled pixel" in evaluate(empty, "--json", str(tmp_path / "s.json"))
    assert not (tmp_path / "s.json").exists()
    assert "the train split has no labelled pixel" in inspect(empty, "--splits", "train", "--class-weights", "inverse",
                                                              "--out", str(tmp_path / "w.yaml"))
    assert not (tmp_path / "w.yaml").exists()
    assert inspect(some, "--splits", "foo").startswith("error: --splits foo: comma-separated stages")
    assert inspect(some, "--splits", "test").startswith("error: --splits: the config has no test split")
    same = str(tmp_path / "c.png")
    assert "--json and --confusion are one file" in evaluate(some, "--json", same, "--confusion", same)
    assert "give a .png path" in evaluate(some, "--confusion", str(tmp_path / "c.txt"))
    assert "not a regular file" in evaluate(some, "--json", str(tmp_path / "pipe.json"))
    assert "not a regular file" in inspect(some, "--class-weights", "median", "--out", str(tmp_path / "pipe.json"))
    # "missing/.." resolves on paper, not on the disk: the whole scoring ran, then the write failed
    assert "its folder cannot be written" in evaluate(some, "--json", str(tmp_path / "missing" / ".." / "s.json"))
    if Path("/proc/self").is_dir():  # a folder that exists and takes no new file, whoever asks
        assert "its folder cannot be written" in evaluate(some, "--json", "/proc/dptune-scores.json")
    # a class the train split never shows gets weight 0, and is named
    road = camvid_copy(tmp_path / "road", FRAMES[:1], fill=3)
    assert inspect_main([config, "--root", str(road), "--splits", "train", "--class-weights", "median"]) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert warned == ["warning: 10 class(es) have no pixel in the train split, weight 0: Sky, Building, Pole, "
                      "Pavement, Tree, SignSymbol, Fence, Car, ..."], warned


def test_an_input_that_runs_out_of_memory_or_has_a_newline_in_its_name_is_one_line(models, tmp_path, capsys,
                                                                                    monkeypatch):
    """A MemoryError (an 8000x6000 photo at --scales 1,4) ended predict in a traceback and the rest
    of the folder was lost; a name with a newline split its line and lost the reason."""
    from dptune.inference.predictor import Predictor

    (tmp_path / "in").mkdir()
    shutil.copy(FRAMES[0], tmp_path / "in" / "a.jpg")
    shutil.copy(FRAMES[1], tmp_path / "in" / "b_huge.jpg")
    (tmp_path / "in" / "c\nbad.png").write_text("not an image")
    shutil.copy(FRAMES[2], tmp_path / "in" / "d.jpg")
    plain = Predictor.predict

    def predict(self, image, **kwargs):
        if image.shape[0] == 360 and image[0, 0, 0] == huge[0, 0, 0] and (image == huge).all():
            raise MemoryError
        return plain(self, image, **kwargs)

    huge = np.asarray(Image.open(FRAMES[1]).convert("RGB"))
    monkeypatch.setattr(Predictor, "predict", predict)
    rc = predict_main(["--model", str(models / "segmentation"), "--images", str(tmp_path / "in"), "--out",
                       str(tmp_path / "out"), "--device", "cpu"])
    lines = errors(capsys)
    assert rc == 2 and lines == [
        f"error: {tmp_path / 'in' / 'b_huge.jpg'}: out of memory predicting it (the image, at the sizes predicted, is "
        "too large for this machine)",  # --scales is no option of a depth model's
        f"error: {tmp_path / 'in'}/c\\nbad.png: not a readable image",
        f"error: 2 of 4 images could not be predicted (each named above, first {tmp_path / 'in' / 'b_huge.jpg'}); "
        "the other 2 were predicted"], lines
    assert (tmp_path / "out" / "d.png").exists()


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_a_one_pixel_tall_image_is_predicted_at_any_scale_predict_accepts(models, tmp_path, capsys, mode):
    """--scales 0.5 resized a 1x53 image to 0 rows: "height and width must be > 0"."""
    (tmp_path / "in").mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (1, 53, 3), np.uint8)).save(tmp_path / "in" / "row.png")
    assert predict_main(["--model", str(models / "segmentation"), "--images", str(tmp_path / "in"), "--out",
                         str(tmp_path / "out"), "--device", "cpu", "--mode", mode, "--scales", "0.125,0.5,1"]) == 0
    assert read_png(tmp_path / "out" / "row.png").shape == (1, 53)


def test_a_failure_naming_an_output_with_a_newline_keeps_its_reason_on_one_line():
    """An input "good\\nname.jpg" whose output could not be written said only "OUT/good": the reason,
    after the output's newline, was lost."""
    import errno

    from dptune.tools.outputs import OutputRefused
    from dptune.tools.predict_run import failure_reason

    e = OutputRefused(errno.ENOSPC, "No space left on device", "out/good\nname.png")
    assert failure_reason(e, "in/good\nname.jpg") == "out/good\\nname.png: cannot be written (No space left on device)"


def test_an_empty_output_path_is_refused_in_one_line(models, tmp_path, capsys, monkeypatch):
    """``--json ''`` (an unset shell variable) made evaluate write no scores and say nothing, exit 0;
    predict's ``--out ''`` is the current folder; the benchmark's failed at the end of its run."""
    from dptune.export.cli import main as export_main
    from dptune.tools.benchmark import main as bench_main
    from dptune.tools.config_reference import main as reference_main
    from dptune.tools.inspect import main as inspect_main

    monkeypatch.chdir(tmp_path)
    model = camvid_model(tmp_path / "model")
    runs = [(evaluate_main, ["--model", str(model), "--root", str(CAMVID), "--images", "val/0016E5_0799*.jpg",
                             "--masks", "valannot/{stem}.png", "--labels", "labels.yaml", "--json", ""], "--json"),
            (evaluate_main, ["--model", str(model), "--confusion", " "], "--confusion"),
            (predict_main, ["--model", str(models / "segmentation"), "--images", str(FRAMES[0]), "--out", ""], "--out"),
            (inspect_main, ["--config", "x.yaml", "--out", ""], "--out"),
            (bench_main, ["--json", ""], "--json"),
            (export_main, [str(models / "segmentation"), ""], "out_dir"),
            (reference_main, ["--write", ""], "--write")]
    for main, args, flag in runs:
        with pytest.raises(SystemExit) as stop:
            main(args)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"error: argument {flag}: an empty path" in err, (flag, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_device_this_torch_cannot_run_on_is_one_line(models, capsys):
    """--device cuda on a CPU-only torch ended in 'Torch not compiled with CUDA enabled' (a traceback, exit 1)
    at the first image; --device foo and mps the same way (a user attack)."""
    import torch

    wrong = ["foo", "mps"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:1"])
    for main, args in ((predict_main, ["--model", str(models / "segmentation"), "--images", str(FRAMES[0]),
                                       "--out", "never"]),
                       (evaluate_main, ["--model", str(models / "depth"), "--images", str(FRAMES[0])])):
        for device in wrong:
            if device == "mps" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
                continue
            with pytest.raises(SystemExit) as stop:
                main([*args, "--device", device])
            err = capsys.readouterr().err
            said = f"error: argument --device: {device if device != 'foo' else repr(device)}"
            assert stop.value.code == 2 and said in err and "Traceback" not in err, err


def test_an_option_that_takes_one_value_given_twice_is_refused(capsys):
    """predict --images a --images b predicted b only and dropped a without a word (a user attack)."""
    for main, args, flag in ((predict_main, ["--model", "m", "--images", "a.jpg", "--images", "b.jpg", "--out", "o"],
                              "--images"),
                             (evaluate_main, ["--model", "m", "--model", "n"], "--model")):
        with pytest.raises(SystemExit) as stop:
            main(args)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"error: {flag} given twice" in err, err


def test_an_image_or_depth_map_past_opencvs_pixel_limit_says_the_limit_and_how_to_raise_it(tmp_path):
    """A 40000 x 30000 aerial PNG failed with OpenCV's "(-215:Assertion failed) pixels <=
    CV_IO_MAX_IMAGE_PIXELS in function 'validateInputImageSize'". The limit is lowered here (it is
    read when OpenCV loads) so that a 100 x 100 file passes it."""
    import os
    import subprocess
    import sys

    import cv2

    cv2.imwrite(str(tmp_path / "tile.png"), np.zeros((100, 100, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "depth.png"), np.full((100, 100), 1000, np.uint16))
    cv2.imwrite(str(tmp_path / "mask.png"), np.zeros((100, 100), np.uint8))
    code = ("from dptune.data.images import read_image\nfrom dptune.data.masks import read_mask\nfrom dptune.data.depth_files import read_depth\n"
            "from dptune.errors import DataError\nimport sys\n"
            "for f, path in ((read_image, sys.argv[1]), (lambda p: read_depth(p, 1000), sys.argv[2]),\n"
            "                (lambda p: read_mask(p, False), sys.argv[3])):\n"
            "    try: f(path)\n    except DataError as e: print(e)\n")
    out = subprocess.run([sys.executable, "-c", code, *(str(tmp_path / f) for f in ("tile.png", "depth.png", "mask.png"))],
                         capture_output=True, text=True, env={**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": "1000"},
                         timeout=120).stdout.splitlines()
    assert len(out) == 3, out
    for line, name in zip(out, ("tile.png", "depth.png", "mask.png"), strict=True):
        assert line.startswith(str(tmp_path / name) + ": ")
        assert "more pixels than OpenCV decodes (1,000; set the environment variable OPENCV_IO_MAX_IMAGE_PIXELS" in line
        assert "Assertion" not in line and "loadsave" not in line


def test_images_and_masks_past_pils_own_pixel_limit_are_read_as_opencv_reads_them(tmp_path, monkeypatch):
    """PIL refuses to open more than 179 M pixels ("could be decompression bomb DOS attack"): a large
    aerial tile that OpenCV decodes (up to 2**30 pixels) stopped a header check, a depth pair and its
    mask with a raw DecompressionBombError. PIL's limit is lowered here so a 60 x 40 file passes it."""
    import cv2
    from PIL import Image

    from dptune.data.images import image_header_size, path_orientation, read_image, sensor_orientation
    from dptune.data.masks import read_mask

    cv2.imwrite(str(tmp_path / "tile.png"), np.zeros((40, 60, 3), np.uint8))
    mask = np.arange(2400, dtype=np.uint8).reshape(40, 60) % 3
    Image.fromarray(mask).save(tmp_path / "mask.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    tile = str(tmp_path / "tile.png")
    assert image_header_size(tile) == (40, 60) and read_image(tile).shape == (40, 60, 3)
    assert path_orientation(tile) == 1 and sensor_orientation(tile) == 1
    assert np.array_equal(read_mask(str(tmp_path / "mask.png"), rgb=False), mask)
    assert Image.MAX_IMAGE_PIXELS == 500  # PIL's own setting is left as it was


def test_reading_files_from_many_threads_leaves_pils_pixel_limit_as_it_was(tmp_path):
    """The data check reads files from a thread pool: the lifted limits of concurrent reads were
    put back out of order, and PIL's decompression-bomb check stayed off for the whole process (a
    review)."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from dptune.data.images import image_header_size
    from dptune.data.masks import read_mask

    paths = []
    for i in range(16):
        Image.fromarray(np.full((40, 60), i % 3, np.uint8)).save(tmp_path / f"m{i}.png")
        paths.append(str(tmp_path / f"m{i}.png"))
    before, interval = Image.MAX_IMAGE_PIXELS, sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often, as on a loaded machine
    try:
        with ThreadPoolExecutor(8) as pool:
            for _ in range(100):
                list(pool.map(lambda p: (read_mask(p, rgb=False), image_header_size(p)), paths))
    finally:
        sys.setswitchinterval(interval)
    assert Image.MAX_IMAGE_PIXELS == before is not None


def test_a_predict_stopped_by_sigterm_lists_what_it_wrote_and_says_so(models, tmp_path):
    """A SIGTERM (a batch scheduler, ``timeout``, ``docker stop``) ended predict at once: no line, exit -15, and
    dptune-predict.json without the prediction it had written, so the rerun was refused for a file "predict did
    not write" (a user attack). It stops as a Ctrl-C does: the list saved, one line, exit 143."""
    import signal
    import subprocess
    import sys
    import time

    images = tmp_path / "in"
    images.mkdir()
    for i in range(100):  # far more than predict gets through before the signal
        (images / f"f{i:02d}.jpg").symlink_to(FRAMES[i % len(FRAMES)])
    out = tmp_path / "preds"
    proc = subprocess.Popen([sys.executable, "-m", "dptune.command", "predict", "--model", str(models / "segmentation"),
                             "--images", str(images), "--out", str(out), "--device", "cpu"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "f00.png").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 143 and lines == ["error: interrupted (SIGTERM); the command stopped before it finished"], err
    spec = json.loads((out / "dptune-predict.json").read_text())
    written = sorted(p.name for p in out.iterdir() if p.name != "dptune-predict.json")
    assert spec["complete"] is False and written and sorted(spec["files"]) == written, (spec, written)
