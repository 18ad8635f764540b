"""Depth readers against numpy on real NYU, KITTI and 7-Scenes files; augmentations keep depth exact."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import DEPTH_FORMATS, KITCHEN, needs
from PIL import Image

from dptune.data.depth import depth_train_transforms, eval_crop_mask
from dptune.data.depth_files import read_depth
from dptune.data.loaders import collate
from dptune.errors import ConfigError, DataError


@needs(DEPTH_FORMATS)
@pytest.mark.parametrize("kind, scale, lo, hi", [("nyu", 1000, 0.5, 10.0), ("kitti", 256, 1.0, 90.0)])
def test_nyu_and_kitti_16_bit_pngs_read_to_metres(kind, scale, lo, hi):
    files = sorted((DEPTH_FORMATS / kind / "depth").glob("*.png"))
    assert len(files) == 3
    for f in files:
        ours = read_depth(str(f), scale)
        raw = np.asarray(Image.open(f)).astype(np.float64)  # PIL reads the 16-bit PNG as I;16
        assert ours.dtype == np.float32 and ours.shape == raw.shape
        np.testing.assert_allclose(ours, raw / scale, rtol=1e-6)
        valid = ours[ours > 0]
        assert lo < valid.min() and valid.max() < hi  # metres: a room (NYU), a road (KITTI)
        assert np.array_equal(ours == 0, raw == 0)  # 0 stays "no measurement"
    if kind == "kitti":  # sparse projected LiDAR: most pixels have no return
        assert (read_depth(str(files[0]), 256) == 0).mean() > 0.7


def test_npy_and_float_tiff_are_metres_divided_by_scale(tmp_path):
    import cv2

    depth = np.array([[0.0, 1.5], [np.nan, 3.25]], np.float32)
    np.save(tmp_path / "d.npy", depth)
    cv2.imwrite(str(tmp_path / "d.tiff"), depth)
    for name in ("d.npy", "d.tiff"):
        got = read_depth(str(tmp_path / name), 1.0)
        assert np.array_equal(got, np.array([[0.0, 1.5], [0.0, 3.25]], np.float32)), name  # NaN -> invalid
        # no scale given: float files are metres (they were divided by 1000: 2.5 m read as 0.0025 m)
        assert np.array_equal(read_depth(str(tmp_path / name)), got), name
    cv2.imwrite(str(tmp_path / "mm.png"), np.array([[0, 1500], [2000, 3250]], np.uint16))
    assert np.array_equal(read_depth(str(tmp_path / "mm.png")), np.array([[0, 1.5], [2.0, 3.25]], np.float32))


@needs(KITCHEN)
def test_the_largest_16_bit_value_is_no_measurement():
    """7-Scenes (and other Kinect data) mark "no reading" with 65535 as well as 0: frame 234 of the
    kitchen holds 12 such pixels, which read as 65.535 m of valid depth (a model without max_depth
    trained on them). A value at the top of an integer range is saturated, not a distance."""
    import cv2

    f = KITCHEN / "train" / "depth" / "frame-000234.png"
    raw = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and int((raw == 65535).sum()) == 12
    got = read_depth(str(f), 1000)
    assert np.array_equal(got == 0, (raw == 0) | (raw == 65535))
    np.testing.assert_allclose(got[(raw > 0) & (raw < 65535)], raw[(raw > 0) & (raw < 65535)] / 1000, rtol=1e-6)


def test_saturated_integer_depth_is_invalid_in_every_reader(tmp_path):
    import cv2

    stored = np.array([[0, 1500], [65535, 3250]], np.uint16)
    cv2.imwrite(str(tmp_path / "mm.png"), stored)
    np.save(tmp_path / "mm.npy", stored)
    for name in ("mm.png", "mm.npy"):
        assert np.array_equal(read_depth(str(tmp_path / name), 1000), np.array([[0, 1.5], [0, 3.25]], np.float32))
    # the code is 16-bit data's: other integer types keep their largest value (a uint8 array's 255 was dropped)
    np.save(tmp_path / "u8.npy", np.array([[100, 255]], np.uint8))
    assert np.array_equal(read_depth(str(tmp_path / "u8.npy"), 100), np.array([[1.0, 2.55]], np.float32))
    # float data has no such code: its largest finite values are depth
    np.save(tmp_path / "f.npy", np.array([[65535.0, 2.0]], np.float32))
    assert np.array_equal(read_depth(str(tmp_path / "f.npy"), 1000), np.array([[65.535, 0.002]], np.float32))


@needs(KITCHEN)
@pytest.mark.parametrize("store, scale, expected", [
    ("metres-in-png", None, "with data.depth_scale 1 the median would be"),  # AbsRel 61.9 without a word before
    ("millimetres", 1.0, "with data.depth_scale 1000 the median would be"),
    ("zeros", None, "no depth map has a valid"),
])
def test_a_split_whose_depth_cannot_be_metres_stops_naming_the_likely_scale(tmp_path, store, scale, expected):
    """7-Scenes frames stored as whole metres in a 16-bit PNG, millimetres read with scale 1, or no
    measurement at all: the pre-flight check stops before training."""
    import cv2

    from dptune.data.depth_datamodule import DepthDataModule

    for sub in ("rgb", "depth"):
        (tmp_path / "train" / sub).mkdir(parents=True)
    for f in sorted((KITCHEN / "train" / "rgb").glob("*.jpg"))[:3]:
        (tmp_path / "train" / "rgb" / f.name).symlink_to(f)
        mm = np.asarray(Image.open(KITCHEN / "train" / "depth" / f"{f.stem}.png")).astype(np.uint16)
        raw = {"metres-in-png": np.round(mm / 1000.0), "millimetres": mm, "zeros": mm * 0}[store]
        cv2.imwrite(str(tmp_path / "train" / "depth" / f"{f.stem}.png"), raw.astype(np.uint16))
    dm = DepthDataModule(root=str(tmp_path), depth_scale=scale, image_size=64, num_workers=0,
                         splits={"train": {"images": "train/rgb/*.jpg", "depth": "train/depth/{stem}.png"}})
    with pytest.raises(DataError, match=expected) as err:
        dm.setup("fit")
    assert "data.splits.train" in str(err.value)


@needs(KITCHEN)
def test_bad_depth_files_are_named(tmp_path):
    good = KITCHEN / "train" / "depth" / "frame-000000.png"
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 3])
    eight = Image.fromarray((np.asarray(Image.open(good)) // 256).astype(np.uint8))
    for name in ("eight.png", "eight.tif", "eight.jpg"):  # 8-bit depth in any format (TIFF and JPEG trained before)
        eight.save(tmp_path / name)
    # .npy of 8-bit integers read as millimetres (0.255 m at most), and the unit check then asked for a smaller scale
    np.save(tmp_path / "eight.npy", np.asarray(eight))
    np.save(tmp_path / "eight-signed.npy", (np.asarray(eight) // 2).astype(np.int8))
    (tmp_path / "empty.png").write_bytes(b"")  # OpenCV's assertion traceback in fit, evaluate and inspect
    for name, message in [("cut.png", "not a readable depth map"), ("empty.png", "empty file \\(0 bytes\\)"),
                          ("eight.png", "8-bit image"),
                          ("eight.tif", "8-bit image"), ("eight.jpg", "8-bit image"), ("missing.png", "file not found"),
                          ("eight.npy", "8-bit integers"), ("eight-signed.npy", "8-bit integers")]:
        with pytest.raises(DataError, match=message) as err:
            read_depth(str(tmp_path / name), None if name.endswith(".npy") else 1000)  # .npy: no unit given
        assert name in str(err.value)
    # a unit stated beside the files (dptune's depth_format.json) reads them
    stated = tmp_path / "stated"
    stated.mkdir()
    np.save(stated / "eight.npy", np.asarray(eight))
    (stated / "depth_format.json").write_text('{"metric": true, "value_per_metre": 100}')
    assert read_depth(str(stated / "eight.npy")).max() == pytest.approx(np.asarray(eight).max() / 100)


def test_augmentations_never_invent_depth():
    """Resize, crop and flip reach depth by nearest neighbour: every output value is an input value
    (an average of 1 m and 0 = invalid would be a 0.5 m surface that does not exist); the image is
    jittered, depth is not."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    depth = rng.choice(np.array([0.0, 1.0, 2.5, 7.0], np.float32), size=(120, 160))
    pipe = depth_train_transforms((48, 64), (32, 48))
    pipe.set_random_seed(0)
    values = set(np.unique(depth).tolist())
    for _ in range(20):
        out = pipe(image=image, depth=depth)
        assert out["depth"].shape == (32, 48) and out["image"].shape == (32, 48, 3)
        assert set(np.unique(out["depth"]).tolist()) <= values


def test_eval_crops_and_padding():
    eigen = eval_crop_mask((480, 640), "eigen")
    assert eigen.sum() == (471 - 45) * (601 - 41) and eigen[45, 41] and not eigen[44, 41]
    garg = eval_crop_mask((375, 1242), "garg")
    assert garg[int(0.40810811 * 375), int(0.03594771 * 1242)] and not garg[0, 0]
    assert eval_crop_mask((10, 10), "none") is None
    import torch

    items = [{"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "depth": torch.ones(4, 6), "index": 0},
             {"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "depth": torch.ones(5, 3), "index": 1}]
    batch = collate(items)
    assert batch["depth"].shape == (2, 5, 6) and batch["sizes"] == [(4, 6), (5, 3)]
    assert (batch["depth"][0, 4:] == 0).all() and (batch["depth"][1, :, 3:] == 0).all()  # padding is invalid


@pytest.mark.parametrize("scale", [0, -1000, 1e-300, 1e300])  # 0 or inf in float32, where maps are divided
def test_a_depth_scale_that_is_no_scale_is_refused(scale):
    from dptune.data.depth_datamodule import DepthDataModule
    from dptune.errors import ConfigError

    with pytest.raises(ConfigError, match="depth_scale must be a positive number"):
        DepthDataModule(root=".", depth_scale=scale, splits={"train": {"images": "x/*.jpg", "depth": "{stem}.png"}})


@needs(KITCHEN)
def test_flips_and_crops_keep_image_and_depth_aligned_on_an_image_drawn_from_its_depth():
    """A real 7-Scenes depth map drawn as the image (grey level = depth): after resize, random crop,
    flip and photometric jitter (monotonic in grey level), the image's grey levels must still rank
    like the depth at the same pixels. Noise images (as above) cannot tell a flip of one but not the
    other: here the image flipped alone ranks unlike the depth."""
    depth = read_depth(str(KITCHEN / "train" / "depth" / "frame-000000.png"), 1000)
    grey = np.clip(depth * 60, 0, 255).astype(np.uint8)
    pipe = depth_train_transforms((192, 256), (160, 224))
    pipe.set_random_seed(0)

    def rank_corr(a: np.ndarray, b: np.ndarray) -> float:
        ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
        return float(np.corrcoef(ra, rb)[0, 1])

    flips = 0
    for _ in range(20):
        out = pipe(image=np.repeat(grey[..., None], 3, 2), depth=depth)
        valid = out["depth"] > 0
        assert rank_corr(out["image"][..., 0][valid], out["depth"][valid]) > 0.9
        assert rank_corr(out["image"][:, ::-1, 0][valid], out["depth"][valid]) < 0.6  # the test can tell
        w = out["depth"].shape[1] // 3
        flips += (out["depth"][:, :w].mean() > out["depth"][:, -w:].mean()) != (depth[:, :213].mean() > depth[:, -213:].mean())
    assert 0 < flips < 20  # both orientations were drawn


@needs(KITCHEN)
def test_a_map_in_another_unit_than_its_split_is_named(tmp_path):
    """Three 7-Scenes maps in millimetres and one in metres (same 16-bit PNG format): the split is
    plausible, the odd map is not; it stops the run naming that file (or is skipped when asked)."""
    import cv2

    from dptune.data.depth_datamodule import DepthDataModule

    for sub in ("rgb", "depth"):
        (tmp_path / "train" / sub).mkdir(parents=True)
    frames = sorted((KITCHEN / "train" / "rgb").glob("*.jpg"))[:4]
    for k, f in enumerate(frames):
        (tmp_path / "train" / "rgb" / f.name).symlink_to(f)
        mm = np.asarray(Image.open(KITCHEN / "train" / "depth" / f"{f.stem}.png")).astype(np.float64)
        cv2.imwrite(str(tmp_path / "train" / "depth" / f"{f.stem}.png"), (np.round(mm / 1000) if k == 3 else mm).astype(np.uint16))
    splits = {"train": {"images": "train/rgb/*.jpg", "depth": "train/depth/{stem}.png"}}
    with pytest.raises(DataError, match=f"{frames[3].stem}.png: median valid depth .* not plausible metres"):
        DepthDataModule(root=str(tmp_path), image_size=64, num_workers=0, splits=splits).setup("fit")
    dm = DepthDataModule(root=str(tmp_path), image_size=64, num_workers=0, splits=splits, on_bad_sample="skip")
    dm.setup("fit")
    assert len(dm.datasets["train"].indices) == 3 and dm.skipped["train"] == 1


@pytest.mark.parametrize("spec, said", [
    ('{"metric": false, "meaning": "relative inverse depth"}', "relative inverse depth"),
    ('{"metric": true, "value_per_metre": "256"}', "value_per_metre '256'"),
    ('{"metric": true, "value_per_metre": -256}', "value_per_metre -256"),
    ('{"metric": true, "value_per_metre": 256', "not readable JSON"),
])
def test_a_depth_format_file_that_says_no_usable_scale_is_named(tmp_path, spec, said):
    """predict writes depth_format.json beside its maps and the reader follows it; a broken one (or a
    relative model's, metric: false) was passed over and the maps read as millimetres."""
    from dptune.data.depth import DepthFolderSource

    (tmp_path / "d").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "d" / "a.png")
    Image.fromarray(np.full((8, 8), 2560, np.uint16)).save(tmp_path / "d" / "a_depth.png")
    (tmp_path / "d" / "depth_format.json").write_text(spec)
    src = DepthFolderSource(str(tmp_path), "d/a.png", "d/{stem}_depth.png")
    with pytest.raises(ConfigError, match="depth_format.json: .*" + re.escape(said)):
        src.load(0)
    # the folder's file, said once: not once per map as a bad sample, and not skipped map by map
    for i in range(1, 4):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "d" / f"{i}.png")
        Image.fromarray(np.full((8, 8), 2560, np.uint16)).save(tmp_path / "d" / f"{i}_depth.png")
    from dptune.data.depth_datamodule import DepthDataModule

    for skip in ("error", "skip"):
        dm = DepthDataModule(root=str(tmp_path), image_size=8, num_workers=0, on_bad_sample=skip,
                             splits={"train": {"images": "d/[0-9a].png", "depth": "d/{stem}_depth.png"}})
        with pytest.raises(ConfigError) as err:
            dm.setup("fit")
        assert str(err.value).count("depth_format.json") == 1 and len(str(err.value).splitlines()) == 1, err.value


def test_a_depth_scale_given_against_the_depth_format_file_is_said(tmp_path, caplog):
    from dptune.data.depth import DepthFolderSource

    (tmp_path / "d").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "d" / "a.png")
    Image.fromarray(np.full((8, 8), 2560, np.uint16)).save(tmp_path / "d" / "a_depth.png")
    (tmp_path / "d" / "depth_format.json").write_text('{"metric": true, "value_per_metre": 256}')
    assert DepthFolderSource(str(tmp_path), "d/a.png", "d/{stem}_depth.png").load(0)[1].max() == pytest.approx(10.0)
    with caplog.at_level("WARNING"):
        got = DepthFolderSource(str(tmp_path), "d/a.png", "d/{stem}_depth.png", scale=1000.0).load(0)[1]
    assert got.max() == pytest.approx(2.56) and "depth_format.json says 256" in caplog.text
    # a file by that name that is no depth format (a user's notes) is not followed; a broken one is passed
    # over when a depth_scale is given (it is used whatever the file says)
    from dptune.data.depth_files import sidecar_scale

    (tmp_path / "d" / "depth_format.json").write_text('{"mine": "user notes"}')
    sidecar_scale.cache_clear()  # read once per folder in a process
    assert DepthFolderSource(str(tmp_path), "d/a.png", "d/{stem}_depth.png").load(0)[1].max() == pytest.approx(2.56)
    (tmp_path / "d" / "depth_format.json").write_text('{"metric": true, "value_per_metre": "256"')
    sidecar_scale.cache_clear()
    got = DepthFolderSource(str(tmp_path), "d/a.png", "d/{stem}_depth.png", scale=256.0).load(0)[1]
    assert got.max() == pytest.approx(10.0)


def test_a_label_template_that_gives_two_images_one_file_is_refused(tmp_path):
    """Without {stem}, {name} or {dir} every image was paired with one depth map (or mask)."""
    from dptune.data.depth import DepthFolderSource
    from dptune.data.sources import FolderSource

    for k in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{k}.png")
    with pytest.raises(DataError, match="same depth file"):
        DepthFolderSource(str(tmp_path), "*.png", "depth.png")
    with pytest.raises(DataError, match="same mask file"):
        FolderSource(str(tmp_path), "*.png", "mask.png")


def test_minus_infinity_is_no_measurement_like_nan_and_plus_infinity(tmp_path):
    from dptune.data.depth import DepthFolderSource

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    d = np.full((4, 4), 2.0, np.float32)
    d[0], d[1, 0], d[2, 0] = np.nan, np.inf, -np.inf
    np.save(tmp_path / "a.npy", d)
    got = DepthFolderSource(str(tmp_path), "a.png", "{stem}.npy").load(0)[1]
    assert (got[0] == 0).all() and got[1, 0] == got[2, 0] == 0 and got[3].min() == 2.0
    d[3, 3] = -1.0  # a finite negative value is still a bad file
    np.save(tmp_path / "a.npy", d)
    with pytest.raises(DataError, match="1 negative depth value"):
        DepthFolderSource(str(tmp_path), "a.png", "{stem}.npy").load(0)


@needs(DEPTH_FORMATS)
def test_a_template_pairs_files_named_apart_by_the_part_the_glob_matched():
    """NYU Depth v2 names a frame's image rgb_00045.jpg and its depth sync_depth_00045.png: no
    {stem} template pairs them; {id} (what the glob's wildcards matched in the file name) does."""
    from dptune.data.depth import DepthFolderSource

    root = DEPTH_FORMATS / "nyu"
    source = DepthFolderSource(str(root), "rgb/rgb_*.jpg", "depth/sync_depth_{id}.png", scale=1000.0)
    assert len(source) == 3
    for i, (image, depth) in enumerate(zip(source.images, source.depths, strict=True)):
        number = image.rsplit("rgb_", 1)[1].removesuffix(".jpg")
        assert depth == str(root / "depth" / f"sync_depth_{number}.png")
        rgb, metres, _ = source.load(i)
        raw = np.asarray(Image.open(depth)).astype(np.float64)
        assert rgb.shape[:2] == metres.shape == raw.shape
        np.testing.assert_allclose(metres, raw / 1000, rtol=1e-6)


@pytest.mark.parametrize("template, problem", [("d/{foo}.png", "{foo}"), ("d/{stem.png", "{stem.png"),
                                               ("d/{0}.png", "{0}"), ("d/{stem[9]}.png", "{stem[9]}"),
                                               ("d/{stem!r}.png", "{stem!r}"), ("d/{stem:d}.png", "{stem:d}")])
def test_a_template_with_an_unknown_placeholder_is_one_line_naming_it(tmp_path, template, problem):
    """A placeholder the template language does not have raised Python's KeyError (a traceback)."""
    from dptune.data.depth import DepthFolderSource
    from dptune.data.sources import FolderSource

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    for make in (lambda: DepthFolderSource(str(tmp_path), "*.png", template),
                 lambda: FolderSource(str(tmp_path), "*.png", template)):
        with pytest.raises(DataError) as e:
            make()
        message = str(e.value)
        assert message.startswith(template) and problem in message, message
        assert ("{stem}" in message and "{id}" in message) or "not a format for a name" in message, message
        assert "\n" not in message


@needs(KITCHEN)
def test_a_map_in_another_unit_is_named_with_the_scale_its_own_folder_uses(tmp_path):
    """Folders whose depth_format.json files give different scales: each map is read with its own
    folder's, and the message naming an odd map gave the scale of whichever map was read last."""
    import cv2

    from dptune.data.depth_datamodule import DepthDataModule
    from dptune.data.depth_files import sidecar_scale

    frames = sorted((KITCHEN / "train" / "rgb").glob("*.jpg"))[:8]
    for folder, part in (("a", frames[:3]), ("b", frames[3:])):
        (tmp_path / folder / "depth").mkdir(parents=True)
        for k, f in enumerate(part):
            (tmp_path / folder / f.name).symlink_to(f)
            mm = np.asarray(Image.open(KITCHEN / "train" / "depth" / f"{f.stem}.png")).astype(np.float64)
            stored = np.round(mm / 1000) if folder == "a" and k == 1 else mm * (0.256 if folder == "b" else 1)
            cv2.imwrite(str(tmp_path / folder / "depth" / f"{f.stem}.png"), np.round(stored).astype(np.uint16))
    (tmp_path / "b" / "depth" / "depth_format.json").write_text('{"metric": true, "value_per_metre": 256}')
    sidecar_scale.cache_clear()
    splits = {"train": {"images": "*/*.jpg", "depth": "{dir}/depth/{stem}.png"}}
    with pytest.raises(DataError) as e:
        DepthDataModule(root=str(tmp_path), image_size=64, num_workers=0, splits=splits).setup("fit")
    assert f"a/depth/{frames[1].stem}.png: median valid depth" in str(e.value)
    assert "stored value / 1000)" in str(e.value), str(e.value)
    dm = DepthDataModule(root=str(tmp_path), image_size=64, num_workers=0, splits=splits, on_bad_sample="skip")
    dm.setup("fit")
    assert len(dm.datasets["train"].indices) == 7
    medians = {name: q[1] for name, *q in dm.depth_stats["train"]}
    assert all(0.5 < m < 5 for m in medians.values()), medians  # both folders' maps read to metres


@needs(KITCHEN)
def test_a_folder_whose_depth_format_file_gives_a_wrong_scale_is_checked_on_its_own(tmp_path):
    """Half the maps read at 1000 per metre (no depth_format.json), half at the 1 their folder's file
    wrongly gives: the split's check mixed both (median 1697 m "/ depth_scale 1000", a setting never
    given). Each scale's maps are checked on their own, and the one at fault is named."""
    import cv2

    from dptune.data.depth_datamodule import DepthDataModule
    from dptune.data.depth_files import sidecar_scale

    frames = sorted((KITCHEN / "train" / "rgb").glob("*.jpg"))[:6]
    for folder, part in (("a", frames[:3]), ("b", frames[3:])):
        (tmp_path / folder / "depth").mkdir(parents=True)
        for f in part:
            (tmp_path / folder / f.name).symlink_to(f)
            mm = np.asarray(Image.open(KITCHEN / "train" / "depth" / f"{f.stem}.png"))
            cv2.imwrite(str(tmp_path / folder / "depth" / f"{f.stem}.png"), mm.astype(np.uint16))
    (tmp_path / "b" / "depth" / "depth_format.json").write_text('{"metric": true, "value_per_metre": 1}')
    sidecar_scale.cache_clear()
    splits = {"train": {"images": "*/*.jpg", "depth": "{dir}/depth/{stem}.png"}}
    with pytest.raises(DataError) as e:
        DepthDataModule(root=str(tmp_path), image_size=64, num_workers=0, splits=splits).setup("fit")
    message = str(e.value)
    assert "3 maps read as stored value / 1 per metre" in message and "b/depth/" in message, message
    median = float(re.search(r"median valid depth ([0-9.e+]+) m", message).group(1))
    assert median > 1000, message  # that folder's maps alone, read as metres: millimetre values


@needs(KITCHEN)
def test_a_depth_map_is_turned_upright_with_its_image(tmp_path):
    """A photo with an EXIF orientation (3: turned 180 degrees) was turned upright while its depth map
    was read as stored: trained against a map it no longer lined up with, without a word (a user
    attack; orientation 6 said 'depth map is 640x480 but its image is 480x640'). The map, stored with
    the image's pixels as a sensor stores it, is turned with the image: both upright, as a mask drawn
    on the upright image (a joint source's) lines up with them (a review)."""
    import shutil

    from dptune.data.depth import DepthFolderSource
    from dptune.data.depth_datamodule import DepthDataModule

    (tmp_path / "rgb").mkdir()
    (tmp_path / "depth").mkdir()
    frames = sorted((KITCHEN / "val" / "rgb").glob("*.jpg"))[:2]
    stored, maps = [], []
    for orientation, f in zip((3, 6), frames, strict=True):
        img = Image.open(f)
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(tmp_path / "rgb" / f.name, exif=exif, quality=95)
        stored.append(np.asarray(Image.open(tmp_path / "rgb" / f.name)))  # PIL leaves the orientation to exif_transpose
        shutil.copy(KITCHEN / "val" / "depth" / f"{f.stem}.png", tmp_path / "depth" / f"{f.stem}.png")
        maps.append(read_depth(str(tmp_path / "depth" / f"{f.stem}.png"), 1000))
    source = DepthFolderSource(str(tmp_path), "rgb/*.jpg", "depth/{stem}.png", 1000)
    upright = [np.rot90(stored[0], 2), np.rot90(stored[1], -1)]  # what exif_transpose shows
    turned = [np.rot90(maps[0], 2), np.rot90(maps[1], -1)]
    for i in range(2):
        image, depth, _ = source.load(i)
        assert image.shape == upright[i].shape and np.abs(image.astype(int) - upright[i]).mean() < 1.0
        assert np.array_equal(depth, turned[i])
    dm = DepthDataModule(root=str(tmp_path), depth_scale=1000, image_size=32, num_workers=0, check="header",
                         splits={"train": {"images": "rgb/*.jpg", "depth": "depth/{stem}.png"}})
    dm.setup("fit")  # the quarter-turned one passes the size check: both turned
    assert len(dm.datasets["train"]) == 2


@needs(KITCHEN)
def test_sparse_maps_that_no_loss_can_count_at_the_training_size_are_said(tmp_path, caplog):
    """Maps of about 540 valid pixels (0.2%, a LiDAR-like scan) keep 3-10 once resized to 64x64, below
    the 16 a loss needs to count an image: a whole split trained on nothing (loss and gradients 0)
    with exit 0 and no word (a user attack). One such map is a warning naming it; a split of them stops."""
    import logging

    from dptune.data.depth_datamodule import DepthDataModule

    (tmp_path / "rgb").mkdir()
    (tmp_path / "depth").mkdir()
    frames = sorted((KITCHEN / "train" / "rgb").glob("*.jpg"))[:3]
    rng = np.random.default_rng(0)
    for f in frames:
        (tmp_path / "rgb" / f.name).symlink_to(f)
        depth = np.asarray(Image.open(KITCHEN / "train" / "depth" / f"{f.stem}.png"))
        keep = np.zeros(depth.shape, bool)
        keep.flat[rng.choice(depth.size, 540, replace=False)] = True
        Image.fromarray(np.where(keep & (depth < 65535), depth, 0).astype(np.uint16)).save(tmp_path / "depth" / f"{f.stem}.png")

    def setup():
        dm = DepthDataModule(root=str(tmp_path), depth_scale=1000, image_size=64, num_workers=0,
                             splits={"train": {"images": "rgb/*.jpg", "depth": "depth/{stem}.png"}})
        dm.setup("fit")
        return dm

    with pytest.raises(DataError, match=r"data.splits.train: 3 depth map\(s\) keep fewer than 16 valid pixels once "
                                        r"resized to the training size 64x64 .* no map of the split counts"):
        setup()
    # one dense map among them: trained on, the sparse ones named in a warning
    dense = frames[0].stem
    (tmp_path / "depth" / f"{dense}.png").unlink()
    (tmp_path / "depth" / f"{dense}.png").symlink_to(KITCHEN / "train" / "depth" / f"{dense}.png")
    with caplog.at_level(logging.WARNING, logger="dptune.data.depth_datamodule"):
        assert len(setup().datasets["train"]) == 3
    said = [r.getMessage() for r in caplog.records if "valid pixels once resized" in r.getMessage()]
    assert len(said) == 1 and "2 depth map(s)" in said[0] and str(tmp_path / "depth") in said[0], said
    # a map with no valid pixel at all is named too (the warning only counted them)
    empty = tmp_path / "depth" / f"{frames[1].stem}.png"
    Image.fromarray(np.zeros((480, 640), np.uint16)).save(empty)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dptune.data.depth_datamodule"):
        setup()
    said = [r.getMessage() for r in caplog.records if "no valid pixel" in r.getMessage()]
    assert len(said) == 1 and f"(first: {empty})" in said[0], said


@needs(KITCHEN)
@pytest.mark.parametrize("orientation", [3, 6])
def test_a_depth_map_beside_a_tiff_image_is_turned_as_its_image_is(tmp_path, orientation):
    """A TIFF image with an orientation tag is turned upright by its decoders (OpenCV and PIL alike),
    so dptune's own EXIF step skips it; the depth map beside it was left as stored: misaligned (3:
    the same size, silently) or refused as another size (6) (a user attack)."""
    import shutil

    from dptune.data.depth import DepthFolderSource

    (tmp_path / "rgb").mkdir()
    (tmp_path / "depth").mkdir()
    f = sorted((KITCHEN / "val" / "rgb").glob("*.jpg"))[0]
    stored = np.asarray(Image.open(f))
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "rgb" / f"{f.stem}.tif", exif=exif)
    shutil.copy(KITCHEN / "val" / "depth" / f"{f.stem}.png", tmp_path / "depth" / f"{f.stem}.png")
    stored_map = read_depth(str(tmp_path / "depth" / f"{f.stem}.png"), 1000)
    k = {3: 2, 6: -1}[orientation]
    image, depth, _ = DepthFolderSource(str(tmp_path), "rgb/*.tif", "depth/{stem}.png", 1000).load(0)
    assert np.array_equal(image, np.rot90(stored, k))  # the decoder's turn
    assert np.array_equal(depth, np.rot90(stored_map, k))


@pytest.mark.parametrize("image_ext,image_tag,depth_tag", [(".tif", 3, 3), (".tif", 6, 6), (".jpg", 6, 6),
                                                            (".tif", 3, 1), (".png", 1, 3), (".jpg", 6, 3)])
def test_a_tiff_depth_map_with_its_own_orientation_tag_lines_up_or_is_named(tmp_path, image_ext, image_tag, depth_tag):
    """OpenCV turns a TIFF depth map by its own orientation tag as it decodes it; the map was then
    turned again by its image's orientation (tags 3 and 3: a full turn, silently misaligned; a
    review). A map whose own tag is its image's is upright already; one whose tag differs is named."""
    from dptune.data.depth import DepthFolderSource

    (tmp_path / "rgb").mkdir()
    (tmp_path / "depth").mkdir()
    img = np.zeros((6, 10, 3), np.uint8)
    img[0, 0] = 255  # the same corner marked in both, as stored
    dep = np.full((6, 10), 1000, np.uint16)
    dep[0, 0] = 5000
    for arr, path, tag in ((img, tmp_path / "rgb" / f"a{image_ext}", image_tag),
                           (dep, tmp_path / "depth" / "a.tif", depth_tag)):
        exif = Image.Exif()
        if tag != 1:
            exif[0x0112] = tag
        Image.fromarray(arr).save(path, exif=exif, **({"quality": 100} if image_ext == ".jpg" and arr is img else {}))
    source = DepthFolderSource(str(tmp_path), f"rgb/*{image_ext}", "depth/{stem}.tif", 1000)
    if depth_tag not in (1, image_tag):
        with pytest.raises(DataError) as err:
            source.load(0)
        assert str(tmp_path / "depth" / "a.tif") in str(err.value) and f"orientation tag {depth_tag}" in str(err.value)
        return
    image, depth, _ = source.load(0)
    assert image.shape[:2] == depth.shape
    assert np.unravel_index(np.argmax(image[..., 0]), depth.shape) == np.unravel_index(np.argmax(depth), depth.shape)


def test_the_training_resize_keeps_depth_on_its_image_pixels():
    """The image is area-averaged and the depth map was resized with OpenCV's nearest neighbour, which samples
    at floor(i * scale): at 640x480 -> 224x224 every depth pixel came from 1.4 source columns left and 1.0 rows
    above its image pixel (a review). Depth is resized by the centred nearest neighbour: no depth averaged
    across an edge, none shifted."""
    x = np.tile(np.arange(640, dtype=np.float32), (480, 1))
    y = np.tile(np.arange(480, dtype=np.float32)[:, None], (1, 640))
    image = np.stack([x / 640 * 255, y / 480 * 255, np.zeros_like(x)], -1).round().astype(np.uint8)
    pipe = depth_train_transforms((224, 224), None, jitter=False)
    pipe.set_random_seed(0)
    for depth, channel, scale in ((x + 1, 0, 640), (y + 1, 1, 480)):
        out = pipe(image=image, depth=depth)
        offset = (out["depth"] - 1) - out["image"][..., channel].astype(float) / 255 * scale
        assert abs(offset.mean()) < 0.5, offset.mean()  # source pixels (the image's 8-bit coding: +-1.3)
        assert set(np.unique(out["depth"])) <= set(np.unique(depth))  # nothing averaged


def test_a_label_template_that_gives_an_image_back_as_its_own_label_is_refused(tmp_path):
    """An image glob that matched the masks themselves (``--data.splits.train.images "train/mask/*.png"``)
    trained each mask as its own image, exit 0 (a user attack)."""
    from dptune.data.depth import DepthFolderSource
    from dptune.data.sources import FolderSource

    (tmp_path / "mask").mkdir()
    for k in range(2):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "mask" / f"{k}.png")
    with pytest.raises(DataError, match=r"mask/\{stem\}.png: gives mask file .*0.png for itself"):
        FolderSource(str(tmp_path), "mask/*.png", "mask/{stem}.png")
    with pytest.raises(DataError, match="gives depth file .* for itself"):
        DepthFolderSource(str(tmp_path), "mask/*.png", "{dir}/{name}")
