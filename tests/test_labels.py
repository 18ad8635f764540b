import re

import numpy as np
import pytest
from conftest import CAMVID, DUBAI, needs

from dptune.data.masks import read_mask
from dptune.errors import ConfigError, DataError
from dptune.labels import IGNORE_INDEX, LabelSet


def test_index_encoding_maps_classes_and_ignore():
    ls = LabelSet.from_dict({"names": ["a", "b", "c"], "ignore_values": [7]})
    raw = np.array([[0, 1, 2], [7, 255, 1]], np.uint8)
    out = ls.encode(raw, "m.png")
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 1, 2], [IGNORE_INDEX, IGNORE_INDEX, 1]]


def test_unknown_index_value_names_the_file():
    ls = LabelSet.from_dict({"names": ["a", "b"]})
    with pytest.raises(DataError, match=r"bad/mask\.png: mask has values \[5, 200\]"):
        ls.encode(np.array([[0, 5], [200, 1]], np.uint8), "bad/mask.png")


def test_16bit_index_mask():
    ls = LabelSet.from_dict({"names": ["a", "b"], "map": {1000: "b", 0: "a", 65535: "ignore"}})
    raw = np.array([[0, 1000, 65535]], np.uint16)
    assert ls.encode(raw).tolist() == [[0, 1, IGNORE_INDEX]]
    with pytest.raises(DataError, match="1001"):
        ls.encode(np.array([[1001]], np.uint16))


def test_rgb_encoding_with_ignore_colour_and_unknown_colour():
    ls = LabelSet.from_dict({
        "names": ["red", "green"], "colors": [[255, 0, 0], [0, 255, 0]],
        "mask_format": "rgb", "ignore_colors": [[0, 0, 0]],
    })
    raw = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 0]]], np.uint8)
    assert ls.encode(raw).tolist() == [[0, 1, IGNORE_INDEX]]
    raw[0, 0] = [1, 2, 3]
    with pytest.raises(DataError, match=r"x\.png: .*\(1,2,3\)"):
        ls.encode(raw, "x.png")


def test_reduce_labels_ade_style():
    ls = LabelSet.from_dict({"names": ["wall", "floor"], "reduce_labels": True})
    assert ls.encode(np.array([[0, 1, 2]], np.uint8)).tolist() == [[IGNORE_INDEX, 0, 1]]


def test_merge_by_map_and_name_targets():
    ls = LabelSet.from_dict({"names": ["bg", "vehicle"], "map": {0: "bg", 12: "Vehicle", 13: 1, 9: "ignore"}})
    assert ls.encode(np.array([[0, 12, 13, 9]], np.uint8)).tolist() == [[0, 1, 1, IGNORE_INDEX]]


def test_bad_label_files_are_clear(tmp_path):
    p = tmp_path / "labels.yaml"
    p.write_text("names: [a, A]\n")
    with pytest.raises(DataError, match="unique"):
        LabelSet.from_yaml(p)
    p.write_text("names: [a]\nignore_values: [0]\n")
    with pytest.raises(DataError, match="both a class and in ignore_values"):
        LabelSet.from_yaml(p)
    with pytest.raises(DataError, match="not found"):
        LabelSet.from_yaml(tmp_path / "missing.yaml")


def test_round_trip_through_dict():
    ls = LabelSet.from_dict({"names": ["a", "b"], "ignore_values": [9]})
    again = LabelSet.from_dict(ls.to_dict())
    raw = np.array([[0, 1, 9]], np.uint8)
    assert again.encode(raw).tolist() == ls.encode(raw).tolist()
    rgb = LabelSet.from_dict({"names": ["a"], "colors": [[1, 2, 3]], "mask_format": "rgb", "ignore_colors": [[0, 0, 0]]})
    assert LabelSet.from_dict(rgb.to_dict()).color_map == rgb.color_map


@needs(CAMVID)
def test_camvid_labels_and_a_real_mask():
    ls = LabelSet.from_yaml(CAMVID / "labels.yaml")
    assert ls.num_classes == 11 and ls.names[0] == "Sky"
    raw = read_mask(str(sorted((CAMVID / "trainannot").glob("*.png"))[0]), rgb=False)
    out = ls.encode(raw)
    expected = np.where(raw == 11, IGNORE_INDEX, raw)
    assert np.array_equal(out, expected)


@needs(DUBAI)
def test_dubai_rgb_and_palette_masks_encode():
    ls = LabelSet.from_yaml(DUBAI / "labels.yaml")
    assert ls.mask_format == "rgb"
    masks = sorted(DUBAI.glob("*/masks/*.png"))
    from PIL import Image

    modes = {}
    for m in masks:
        with Image.open(m) as im:
            modes.setdefault(im.mode, m)
    assert "P" in modes and "RGB" in modes  # both kinds are exercised
    for m in modes.values():
        out = ls.encode(read_mask(str(m), rgb=True), m)
        assert set(np.unique(out).tolist()) <= set(range(6)) | {IGNORE_INDEX}


def test_retarget_reads_a_sources_masks_into_a_larger_class_list_by_name():
    """Several sources, one model: raw value -> the source's class -> the model's class of that name."""
    from dptune.errors import ConfigError

    own = LabelSet.from_dict({"names": ["road", "Car"], "map": {0: "road", 7: "car", 9: "ignore"}}, source="src")
    joint = own.retarget(["Sky", "Car", "Road", "Tree"])
    raw = np.array([[0, 7], [9, 255]], np.uint8)
    assert np.array_equal(joint.encode(raw), [[2, 1], [IGNORE_INDEX, IGNORE_INDEX]])
    assert joint.names == ["Sky", "Car", "Road", "Tree"] and joint.annotated == [1, 2]
    assert joint.implicit_ignore == own.implicit_ignore  # an unstated 255 stays unstated
    with pytest.raises(DataError, match=r"values \[3\]"):
        joint.encode(np.array([[3]], np.uint8))  # unknown to the source stays unknown
    with pytest.raises(ConfigError, match=r"\['Car'\] are not in the model's label set"):
        own.retarget(["road", "Sky"])


@needs(DUBAI)
def test_retargeted_rgb_masks_match_a_name_lookup_of_the_source_classes():
    own = LabelSet.from_yaml(DUBAI / "labels.yaml")
    names = ["Sky", "Building", "Road", "Water", "Land", "Vegetation", "Unlabeled"]
    joint = own.retarget(names)
    raw = read_mask(str(sorted(DUBAI.glob("*/masks/*.png"))[0]), rgb=True)
    lookup = np.full(256, IGNORE_INDEX, np.uint8)
    for i, n in enumerate(own.names):
        lookup[i] = names.index(n)
    assert np.array_equal(joint.encode(raw), lookup[own.encode(raw)])
    assert joint.annotated == sorted(names.index(n) for n in own.names)


@pytest.mark.parametrize("text,message", [
    # YAML 1.1 reads No/On as booleans: the classes were trained as 'False' and 'True'
    ("names: [Sky, No, On]", r"names\[1\] is False, not a class name \(YAML reads an unquoted No"),
    ("names: [Sky, null]", r"names\[1\] is None, not a class name"),
    ("names: [Sky, [Road]]", r"names\[1\] is \['Road'\], not a class name"),
    ("names: [Sky, ' ']", r"names\[1\] is ' ', not a class name"),
    # YAML reads zero-padded codes as numbers: 01 and 010 became '1' and '8'
    ("names: [00, 01, 010]", r"names\[0\] is 0, not a class name \(YAML .* quote the name, e.g. 'No' or '01'\)"),
    # a key left empty said nothing, and the other rule was dropped
    ("names: [a, b]\nreduce_labels: true\nmap:\n", None),
    ("names: [a, b]\nignore_values: 0", r"ignore_values must be a list of mask values, e.g. \[0\]"),
    # the string 'no' is truthy: every class moved down by one and class 0 was ignored
    ("names: [a, b]\nreduce_labels: 'no'", r"reduce_labels must be true or false, got 'no'"),
    # mask values were truncated: 1.7 labelled the pixels of value 1
    ("names: [a, b]\nmap: {0: a, 1.7: b}", r"map: mask value 1.7 is not a whole number"),
    ("names: [a, b]\nignore_values: [1.5]", r"ignore_values: mask value 1.5 is not a whole number"),
    ("names: [a, b]\nignore_values: [true]", r"ignore_values: mask value True is not a whole number"),
    ("names: [a, b]\nignore_values: 11", r"ignore_values must be a list of mask values, e.g. \[11\]"),
    ("names: [a, b]\nmap: {0: a, 1: yes}", r"map target True must be a class name, an index or 'ignore' \(YAML"),
    ("names: [a, b]\nmap: {0: a, abc: b}", r"map: mask value 'abc' is not a whole number"),
    ("names: [a, b]\nmap: [0, 1]", r"'map' must be a mapping of mask value -> class"),
    # colours were truncated: 128.9 became 128
    ("names: [a, b]\ncolors: [[0, 0, 0], [128.9, 0, 0]]", r"colors: expected \[r, g, b\] with whole numbers 0-255"),
    # one rule silently won over the other
    ("names: [a, b]\nmap: {0: a, 1: b}\nvalue_map: {0: 1, 1: 0}", r"value_map and map each say how mask values"),
    ("names: [a, b]\nmap: {0: a, 1: b}\nreduce_labels: true", r"map and reduce_labels each say how mask values"),
    # a YAML error says where, as a config file's does
    ("names: [a, b]\nmap: {0: a, 1: b\n", r"not valid YAML: expected ',' or '}', but got '<stream end>' at line 3, column 1"),
])
def test_label_values_yaml_would_turn_into_other_ones_are_refused(tmp_path, text, message):
    path = tmp_path / "labels.yaml"
    path.write_text(text)
    if message is None:  # read as written: the empty key is no rule, reduce_labels applies
        assert LabelSet.from_yaml(path).value_map == {0: IGNORE_INDEX, 1: 0, 2: 1, IGNORE_INDEX: IGNORE_INDEX}
        return
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: .*{message}"):
        LabelSet.from_yaml(path)


def test_the_same_label_rules_written_inline_are_one_line_too():
    with pytest.raises(ConfigError, match=r"data.labels: ignore_values must be a list"):
        LabelSet.from_dict({"names": ["a", "b"], "ignore_values": 11}, source="data.labels")
    with pytest.raises(ConfigError, match=r"data.labels: map: mask value 'abc' is not a whole number"):
        LabelSet.from_dict({"names": ["a", "b"], "map": {"abc": "a"}}, source="data.labels")
    # what stays as it was: quoted digits are a mask value's number, a quoted number is a name
    ls = LabelSet.from_dict({"names": ["a", "12"], "map": {"0": "a", 7: "12"}, "colors": [[0, 0, 0], ["255", 0, 0]]})
    assert ls.names == ["a", "12"] and ls.value_map[0] == 0 and ls.value_map[7] == 1 and ls.colors[1] == [255, 0, 0]
    with pytest.raises(ConfigError, match=r"map: mask value '²' is not a whole number"):
        LabelSet.from_dict({"names": ["a", "b"], "map": {"²": "a"}})


def test_a_label_file_that_is_a_folder_or_not_text_is_one_line(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(DataError, match=r"dir.yaml: is a folder, not a label file"):
        LabelSet.from_yaml(tmp_path / "dir.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"names: [a, \xff\xfe]\n")
    with pytest.raises(DataError, match=r"bin.yaml: not a UTF-8 text file"):
        LabelSet.from_yaml(tmp_path / "bin.yaml")


@needs(DUBAI)
@pytest.mark.parametrize("kind", ["rgb16_png", "grey_as_rgb16_png", "rgba16_png", "rgb16_tiff"])
def test_a_mask_of_more_than_8_bits_per_colour_channel_is_one_line(tmp_path, kind):
    """PIL reads a 16-bit colour PNG or TIFF as 8-bit RGB keeping the high byte: a real colour mask's colours
    all became (0, 0, 0), ignored, and an index mask stored as 16-bit grey in three channels all became class
    0, without a word (a user attack). Refused naming the file; single-channel 16-bit masks read whole."""
    import cv2

    dubai = DUBAI / "labels.yaml"
    src = next(m for m in sorted(DUBAI.glob("*/masks/*.png")) if cv2.imread(str(m)) is not None)
    colour = cv2.imread(str(src))  # BGR, 8-bit
    if kind == "grey_as_rgb16_png":
        colour = np.dstack([colour[..., 0]] * 3)
    if kind == "rgba16_png":
        colour = np.dstack([colour, np.full(colour.shape[:2], 255, np.uint8)])
    path = tmp_path / ("m.tif" if kind == "rgb16_tiff" else "m.png")
    cv2.imwrite(str(path), colour.astype(np.uint16))
    with pytest.raises(DataError, match=f"{path}: 16 bits per colour channel"):
        read_mask(str(path), rgb=kind != "grey_as_rgb16_png")
    assert LabelSet.from_yaml(dubai).mask_format == "rgb"
    grey = tmp_path / "g.png"
    cv2.imwrite(str(grey), np.arange(20, dtype=np.uint16).reshape(4, 5) * 1000)
    assert read_mask(str(grey), rgb=False).max() == 19000  # one channel of 16 bits: read whole


@pytest.mark.parametrize("rgb", [True, False])
def test_a_mask_with_labels_under_transparent_pixels_is_one_line(tmp_path, rgb):
    """A mask's alpha channel was dropped: pixels made transparent to mean "no label" counted as the classes of
    the colours under them (a user attack). Transparent pixels over several colours are refused, naming the
    file and count; a transparent background saved as one colour (an editor's label-layer export) reads as
    that colour, as before (refusing it refused valid masks: a review)."""
    from PIL import Image

    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = 7
    rgba[:, 3:, :3] = 9
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    assert read_mask(str(tmp_path / "opaque.png"), rgb=rgb)[..., 0].max() == 9
    rgba[:, :2, :3] = 0
    rgba[:, :2, 3] = 0  # a cleared, transparent background of one colour
    Image.fromarray(rgba).save(tmp_path / "background.png")
    assert np.unique(read_mask(str(tmp_path / "background.png"), rgb=rgb)[..., 0]).tolist() == [0, 7, 9]
    rgba[:, 2:5, 3] = 0  # labels 7 and 9 hidden under transparency
    Image.fromarray(rgba).save(tmp_path / "m.png")
    with pytest.raises(DataError, match=r"m.png: 20 of 24 pixels are transparent and hold 3 different colours"):
        read_mask(str(tmp_path / "m.png"), rgb=rgb)


def test_a_jpeg_mask_is_one_line(tmp_path):
    """JPEG's lossy coding invents values at every edge: a mask saved as JPEG trained with its noise as real
    classes (a class no mask has got 954 pixels) whenever the noise hit a valid value (a user attack)."""
    from PIL import Image

    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 3
    Image.fromarray(mask).save(tmp_path / "m.jpg", quality=100)
    with pytest.raises(DataError, match=r"m.jpg: a JPEG mask"):
        read_mask(str(tmp_path / "m.jpg"), rgb=False)


def test_masks_from_a_hub_dataset_get_the_same_coding_checks(tmp_path):
    """A hub dataset's mask column skipped the JPEG and 16-bit colour checks folder masks get (a review)."""
    import cv2
    import datasets
    from PIL import Image

    from dptune.data.hf_sources import decode_row

    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 3
    Image.fromarray(mask).save(tmp_path / "m.jpg", quality=100)
    Image.fromarray(mask).save(tmp_path / "m.webp", quality=90)  # lossy WebP
    cv2.imwrite(str(tmp_path / "m16.png"), np.dstack([mask] * 3).astype(np.uint16) * 1000)
    Image.fromarray(mask).save(tmp_path / "ok.png")
    files = [str(tmp_path / n) for n in ("m.jpg", "m.webp", "m16.png", "ok.png")]
    ds = datasets.Dataset.from_dict({"image": [files[-1]] * 4, "mask": files})
    ds = ds.cast_column("image", datasets.Image()).cast_column("mask", datasets.Image())
    for i, said in enumerate(["a JPEG mask", "a lossy WebP mask", "16 bits per colour channel"]):
        with pytest.raises(DataError, match=f"row{i}: {said}"):
            decode_row(ds[i], f"row{i}", "image", "mask", rgb_masks=i == 2)
    assert decode_row(ds[3], "row3", "image", "mask", rgb_masks=False)[1].max() == 3
    # a hub dataset holds its files' bytes (parquet): decoded by datasets, the coding could no longer be told
    # (a second review); dptune's sources read the mask column undecoded and open it themselves
    from dptune.data.hf_sources import HFSource

    held = datasets.Dataset.from_dict({"image": [{"bytes": open(files[-1], "rb").read(), "path": None}] * 4,
                                       "mask": [{"bytes": open(f, "rb").read(), "path": None} for f in files]})
    held = held.cast_column("image", datasets.Image()).cast_column("mask", datasets.Image())
    datasets.DatasetDict({"train": held}).save_to_disk(str(tmp_path / "hub"))
    for i, said in enumerate(["a JPEG mask", "a lossy WebP mask", "16 bits per colour channel"]):
        with pytest.raises(DataError, match=f"#{i}: {said}"):
            HFSource(str(tmp_path / "hub"), "train", "image", "mask", rgb_masks=i == 2).load(i)
    assert HFSource(str(tmp_path / "hub"), "train", "image", "mask").load(3)[1].max() == 3
    with pytest.raises(DataError, match="m.webp: a lossy WebP mask"):
        read_mask(files[1], rgb=False)


def test_grey_with_alpha_and_bilevel_index_masks_read_as_their_values(tmp_path):
    """A grey mask with an alpha channel (an editor's "grayscale with alpha" export) was refused as "2 channels",
    and a 1-bit mask as "unsupported mask mode 1", while the same masks as RGBA or 8-bit grey read (a review)."""
    from PIL import Image

    values = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    Image.fromarray(np.dstack([values, np.full_like(values, 255)]), "LA").save(tmp_path / "la.png")
    assert np.array_equal(read_mask(str(tmp_path / "la.png"), rgb=False), values)
    Image.fromarray(values.astype(bool)).save(tmp_path / "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    assert np.array_equal(read_mask(str(tmp_path / "bits.png"), rgb=False), values.astype(bool).astype(np.uint8))


def test_class_names_match_with_surrounding_spaces_aside(tmp_path):
    """ADE20K's published id2label writes "bed " (with a space): a user's ``bed`` started a fresh classifier row
    while the checkpoint's trained one was dropped, and ``map: {8: bed}`` was "not a class name" (a review)."""
    import torch
    from transformers import DPTConfig, DPTForSemanticSegmentation

    from dptune.models.build import adapt_classifiers

    names = {0: "wall", 1: "bed ", 2: "floor"}
    torch.manual_seed(0)
    model = DPTForSemanticSegmentation(DPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64, image_size=32, patch_size=16,
                                                 neck_hidden_sizes=[16, 16, 16, 16], fusion_hidden_size=16,
                                                 num_labels=3, id2label=names, label2id={v: k for k, v in names.items()}))
    def classifier():
        return [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)][-1]

    before = classifier().weight[1].detach().clone()
    assert adapt_classifiers(model, ["bed", "Wall", "mattress"]) == ["bed", "Wall"]
    assert torch.equal(classifier().weight[0], before)
    spec = LabelSet.from_dict({"names": ["wall", "bed "], "map": {8: "bed", 1: "WALL", 3: "ignore "}})
    assert spec.encode(np.array([[8, 1, 3]], np.uint8)).tolist() == [[1, 0, 255]]
    with pytest.raises(ConfigError, match="unique, case and surrounding spaces aside: 'bed' and 'bed '"):
        LabelSet.from_dict({"names": ["bed", "bed "]})
    # a checkpoint naming two classes alike: the first one's row is carried, as before names were trimmed
    alike = {0: "Car", 1: "car ", 2: "road"}
    model.config.id2label, model.config.label2id = alike, {v: k for k, v in alike.items()}
    first = classifier().weight[0].detach().clone()
    adapt_classifiers(model, ["car", "road", "x"])
    assert torch.equal(classifier().weight[0], first)
