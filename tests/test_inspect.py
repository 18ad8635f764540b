import numpy as np
import yaml
from conftest import CAMVID, KITCHEN, REPO, camvid_subset, needs
from PIL import Image

from dptune.tools.inspect import class_weights, main

pytestmark = needs(CAMVID)


def test_camvid_pixel_frequencies_match_numpy(capsys, tmp_path):
    rc = main([str(REPO / "configs" / "camvid.yaml"), "--root", str(CAMVID), "--splits", "val",
               "--class-weights", "median", "--out", str(tmp_path / "w.yaml")])
    out = capsys.readouterr().out
    assert rc == 2  # --class-weights needs the train split: refused with a clear line
    # a config that sets loader workers (configs/ade20k.yaml does) was refused: 'got multiple values for num_workers'
    config = yaml.safe_load((REPO / "configs" / "camvid.yaml").read_text())
    config["data"]["num_workers"] = 2
    (tmp_path / "workers.yaml").write_text(yaml.safe_dump(config))
    rc = main([str(tmp_path / "workers.yaml"), "--root", str(CAMVID), "--splits", "val"])
    out = capsys.readouterr().out
    assert rc == 0
    counts = np.zeros(12, np.int64)
    for f in sorted((CAMVID / "valannot").glob("*.png")):
        counts += np.bincount(np.asarray(Image.open(f)).ravel(), minlength=12)[:12]
    names = yaml.safe_load((CAMVID / "labels.yaml").read_text())["names"]
    for i, name in enumerate(names):
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [name])
        assert int(line.split()[1]) == counts[i], name
        assert abs(float(line.split()[2]) - counts[i] / counts[:11].sum()) < 1e-4
    ignored = next(ln for ln in out.splitlines() if "ignored pixels" in ln)
    assert abs(float(ignored.split()[-1]) - counts[11] / counts.sum()) < 1e-4


def test_median_frequency_weights():
    from dptune.tools.inspect import SplitStats

    s = SplitStats("train", pixels=np.array([90, 10, 0, 5]), present=np.array([100, 50, 0]))
    w = class_weights(s, "median")  # freq 0.9, 0.2 -> median 0.55
    assert w[0] == round(0.55 / 0.9, 4) and w[1] == round(0.55 / 0.2, 4) and w[2] == 0.0
    inv = class_weights(s, "inverse")
    assert abs(np.mean([x for x in inv if x > 0]) - 1) < 1e-3


def _field(out: str, key: str) -> list[str]:
    return next(ln for ln in out.splitlines() if key in ln).split(key, 1)[1].split()


@needs(KITCHEN)
def test_depth_config_reports_valid_share_and_range_in_metres(capsys):
    rc = main([str(REPO / "configs" / "depth" / "7scenes.yaml"), "--root", str(KITCHEN), "--splits", "val"])
    out = capsys.readouterr().out
    assert rc == 0
    files = sorted((KITCHEN / "val" / "depth").glob("*.png"))
    raw = np.stack([np.asarray(Image.open(f)) for f in files]).astype(np.float64) / 1000
    valid = raw[(raw > 0) & (raw < 65.535)]  # 0 and 65535 (the 16-bit top) are no measurement
    assert f"== val: {len(files)} samples, 0 with problems" in out
    assert abs(float(_field(out, "valid depth pixels:")[0]) - valid.size / raw.size) < 1e-4
    lo, med, hi = (float(v) for v in _field(out, "valid depth (m): min")[0::2][:3])
    assert abs(lo - valid.min()) < 1e-3 and abs(hi - valid.max()) < 1e-3
    assert abs(med - np.median(valid)) <= 1e-3  # 1 mm bins
    # the config's model range (max_depth 10): the range line says how much of the valid depth the model uses
    line = next(ln for ln in out.splitlines() if "in the model's range" in ln)
    inside = ((valid >= 1e-3) & (valid <= 10.0)).sum()
    assert "[0.001, 10] m" in line and f"{inside / valid.size:.4f} of the valid pixels" in line, line
    assert f"({(valid < 1e-3).sum()} below, {(valid > 10.0).sum()} above)" in line, line


@needs(KITCHEN)
def test_depth_config_refuses_segmentation_options_in_one_line(capsys):
    rc = main([str(REPO / "configs" / "depth" / "7scenes.yaml"), "--root", str(KITCHEN), "--splits", "val",
               "--class-weights", "median"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--class-weights" in err[0] and "depth" in err[0]
    # a split the config does not have printed nothing, exit 0
    rc = main([str(REPO / "configs" / "depth" / "7scenes.yaml"), "--root", str(KITCHEN), "--splits", "test"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: --splits: the config has no test split (data.splits: train, val)"], err


@needs(KITCHEN)
def test_multitask_config_reports_each_source_as_its_own_task_does(capsys, tmp_path):
    cfg = yaml.safe_load((REPO / "configs" / "multitask" / "camvid-7scenes.yaml").read_text())
    cfg["data"]["segmentation"].update(root=str(CAMVID), splits={"val": {"images": "val/0016E5_0799*.jpg",
                                                                        "masks": "valannot/{stem}.png"}})
    cfg["data"]["depth"].update(root=str(KITCHEN), splits={"val": {"images": "val/rgb/frame-00060*.jpg",
                                                                  "depth": "val/depth/{stem}.png"}})
    joint = tmp_path / "joint.yaml"
    joint.write_text(yaml.safe_dump(cfg))
    assert main([str(joint), "--splits", "val"]) == 0
    out = capsys.readouterr().out
    assert "camvid (segmentation)" in out and "7scenes-kitchen (depth)" in out

    seg = tmp_path / "seg.yaml"
    seg.write_text(yaml.safe_dump({"data": {**cfg["data"]["segmentation"], "image_size": 224}}))
    assert main([str(seg), "--splits", "val"]) == 0
    seg_out = capsys.readouterr().out
    depth = tmp_path / "depth.yaml"
    rng = {k: v for k, v in (cfg.get("model") or {}).items() if k in ("min_depth", "max_depth")}  # the range line
    depth.write_text(yaml.safe_dump({"task": "depth", "model": rng, "data": cfg["data"]["depth"]}))
    assert main([str(depth), "--splits", "val"]) == 0
    depth_out = capsys.readouterr().out
    seg_part, depth_part = out.split("7scenes-kitchen (depth)")
    assert seg_out.strip() in seg_part and depth_out.strip() in depth_part

    assert main([str(joint), "--root", str(CAMVID)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--root" in err[0]


def test_inspect_of_a_picture_or_a_yaml_list_is_one_line(tmp_path, capsys):
    """``inspect img.jpg`` stopped with a UnicodeDecodeError traceback; a folder named no file."""
    picture = tmp_path / "img.jpg"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(picture)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    for path in (picture, listing, tmp_path, tmp_path / "missing.yaml"):  # a folder said "[Errno 21] Is a directory"
        rc = main([str(path)])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {path}: "), err


@needs(KITCHEN)
def test_a_depth_configs_model_range_that_fit_would_refuse_is_one_line_naming_the_file(tmp_path, capsys):
    """model: not a mapping, a boolean max_depth (read as 1 m) and a range below zero were taken as
    defaults or used as given, or refused without naming the file (adversarial review)."""
    base = yaml.safe_load((REPO / "configs" / "depth" / "7scenes.yaml").read_text())
    base["data"]["root"] = str(KITCHEN)
    for model, words in (("hello", "must be a mapping"), ({"max_depth": True}, "must be numbers"),
                         ({"max_depth": -5.0}, "model.max_depth must be above")):
        cfg = tmp_path / "depth.yaml"
        cfg.write_text(yaml.safe_dump({**base, "model": model}))
        assert main([str(cfg), "--splits", "val"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(cfg) in err[0] and words in err[0], (model, err)


def test_a_mask_of_another_size_than_its_image_is_a_problem_inspect_names(capsys, tmp_path):
    """inspect read each image's size and each mask's classes apart and never compared them: a split
    whose mask was 10 rows short was "0 with problems", exit 0, while fit and evaluate refuse it."""
    root = tmp_path / "data"
    short = camvid_subset(root, sorted((CAMVID / "val").glob("*.jpg"))[:3], short=1)
    rc = main([str(REPO / "configs" / "camvid.yaml"), "--root", str(root), "--splits", "val"])
    out = capsys.readouterr().out
    assert rc != 0 and "3 images, 1 with problems" in out, out
    assert f"{short}: mask is 480x350 but its image is 480x360" in out, out


def test_a_hugging_face_split_is_counted_as_stored_and_a_mask_of_another_size_is_named(capsys, tmp_path):
    """inspect on a split that is no folder: each sample decoded once, its classes counted as numpy
    counts the stored masks, and a mask of another size than its image named as a problem."""
    import datasets

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(3)]
    masks = [rng.integers(0, 3, (48, 64), dtype=np.uint8) for _ in range(3)]
    masks[2] = masks[2][:40]  # 8 rows short
    feats = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    ds = datasets.Dataset.from_dict({"image": imgs, "annotation": [Image.fromarray(m) for m in masks]}, features=feats)
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "hfds"))
    config = tmp_path / "hf.yaml"
    config.write_text(yaml.safe_dump({"data": {
        "source": "hf", "hf": {"dataset": str(tmp_path / "hfds"), "image_column": "image", "mask_column": "annotation"},
        "labels": {"names": ["a", "b", "c"]}, "splits": {"val": {"split": "validation"}}}}))
    rc = main([str(config), "--splits", "val"])
    out = capsys.readouterr().out
    assert rc != 0 and "3 images, 1 with problems" in out and "mask is 64x40 but its image is 64x48" in out, out
    counts = sum(np.bincount(m.ravel(), minlength=3) for m in masks[:2])
    for name, n in zip(["a", "b", "c"], counts, strict=True):
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [name])
        assert int(line.split()[1]) == n, (name, line)
    # a config that streams its training data: inspect reads the whole split all the same (it stopped
    # on "HFSource.__init__() got an unexpected keyword argument 'streaming'")
    spec = yaml.safe_load(config.read_text())
    spec["data"]["hf"].update(streaming=True, num_shards=2)
    config.write_text(yaml.safe_dump(spec))
    rc = main([str(config), "--splits", "val"])
    assert rc != 0 and "mask is 64x40 but its image is 64x48" in capsys.readouterr().out
