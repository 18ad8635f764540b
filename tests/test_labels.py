import numpy as np
import pytest
from conftest import CAMVID, DUBAI, needs

from dptune.data.images import read_mask
from dptune.errors import DataError
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
