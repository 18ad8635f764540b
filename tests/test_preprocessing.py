"""One preprocessing definition: the spec a task builds (``Preprocessing.of_task``) is what
validation (whole images, sliding windows, depth), whole-image and sliding-window inference,
test-time views, both predictors, unpacked checkpoints and the exported processor prepare images
by. Each test changes the spec in that one place (a non-square size, mean, std and resample all
unlike the task's settings) and watches every path follow it. A third-party export's processor
is carried whole (or refused in one line), and its whole-image views at any test-time scale are
prepared as plain ``transformers`` prepares them."""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import numpy as np
import pytest
import torch
from conftest import CAMVID, KITCHEN, TINY, needs
from PIL import Image

from dptune.errors import ConfigError
from dptune.preprocessing import RESAMPLES, Preprocessing

SIZE, MEAN, STD = (48, 64), (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)  # not square: a swapped height / width shows
FRAME = CAMVID / "val" / "0016E5_07959.jpg"


@pytest.fixture
def derived(monkeypatch) -> Preprocessing:
    """Every task's spec, changed where it is built: another size, mean, std and resample than
    the settings (image_size 64, the ViT's 0.5/0.5, bicubic) say."""
    built = Preprocessing.of_task.__func__

    def of_task(cls, image_size, mean, std):
        return dataclasses.replace(built(cls, image_size, mean, std), size=SIZE, mean=MEAN, std=STD,
                                   resample="bilinear")

    monkeypatch.setattr(Preprocessing, "of_task", classmethod(of_task))
    return Preprocessing(SIZE, MEAN, STD, "bilinear")


def _image() -> np.ndarray:
    return np.asarray(Image.open(FRAME).convert("RGB"))


def _reference(export) -> object:
    """What plain transformers prepares images with for an export (independent of dptune's code)."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(export)


def _plain(proc, image: np.ndarray, **kw) -> torch.Tensor:
    return proc(images=image, return_tensors="pt", input_data_format="channels_last", **kw)["pixel_values"]


def _recording(predictor) -> list[torch.Tensor]:
    """The model inputs a predictor feeds, in order."""
    seen, run = [], predictor.normalized_logits
    predictor.normalized_logits = lambda x: (seen.append(x.detach().clone()), run(x))[1]
    return seen


def _inputs(module) -> list[torch.Size]:
    """The normalised input shapes a task's network is run on, in order."""
    seen, run = [], module._run
    module._run = lambda model, x, *a: (seen.append(tuple(x.shape[-2:])), run(model, x, *a))[1]
    return seen


def _validate(module, dm) -> list[torch.Tensor]:
    """Validate ``module`` on ``dm``; the uint8 image batches the loader gave."""
    import lightning.pytorch as pl

    batches = []

    class Grab(pl.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, *args) -> None:
            batches.append(batch["image"].clone())

    pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[Grab()]).validate(module, datamodule=dm, verbose=False)
    return batches


@needs(CAMVID)
def test_every_path_follows_the_spec(derived, tmp_path):
    from dptune.data.datamodule import SegmentationDataModule
    from dptune.export import export
    from dptune.inference.depth_predictor import DepthPredictor
    from dptune.inference.predictor import Predictor
    from dptune.models.source import resolve_pretrained
    from dptune.tasks.multitask import MultiTaskModule
    from dptune.tasks.segmentation import SegmentationModule

    torch.manual_seed(0)
    image = _image()
    labels = {"names": [f"c{i}" for i in range(11)]}
    split = {"val": {"images": f"val/{FRAME.name}", "masks": "valannot/{stem}.png"}}

    # validation: the loader resizes by the task's spec, the module normalises by it
    module = SegmentationModule(config=dict(TINY), label_spec=labels, image_size=64)
    assert module.preprocessing == derived
    dm = SegmentationDataModule(root=str(CAMVID), labels="labels.yaml", image_size=64, val_batch_size=1,
                                splits=split, check=False, num_workers=0)
    batches = _validate(module, dm)
    assert batches[0].shape == (1, 3, *SIZE)
    validation_input = module.normalize(batches[0])

    # sliding-window validation: native images, windows of the spec's size
    slide = SegmentationModule(config=dict(TINY), label_spec=labels, image_size=64, val_mode="slide")
    seen = _inputs(slide)
    batches = _validate(slide, SegmentationDataModule(root=str(CAMVID), labels="labels.yaml", image_size=64,
                                                      val_batch_size=1, splits=split, check=False, num_workers=0,
                                                      val_mode="slide"))
    assert batches[0].shape[-2:] == image.shape[:2] and seen and set(seen) == {SIZE}

    # the export's processor is the spec
    ckpt = tmp_path / "seg.ckpt"
    state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(state)
    torch.save(state, ckpt)
    out = export(str(ckpt), tmp_path / "export")
    cfg = json.loads((out / "preprocessor_config.json").read_text())
    assert cfg["size"] == {"height": SIZE[0], "width": SIZE[1]} and cfg["resample"] == 2  # PIL's BILINEAR
    assert tuple(cfg["image_mean"]) == MEAN and tuple(cfg["image_std"]) == STD
    plain = _reference(out)
    reference = _plain(plain, image)
    assert reference.shape == (1, 3, *SIZE)
    assert torch.allclose(validation_input, reference, atol=1e-5)  # fused multiply-add: to a float rounding
    # a checkpoint unpacked as a pretrained start carries the same processor
    unpacked = _reference(resolve_pretrained(str(ckpt)))
    assert Preprocessing.from_processor(unpacked) == derived and torch.equal(_plain(unpacked, image), reference)

    for ref in (ckpt, out):
        predictor = Predictor.load(str(ref))
        assert predictor.preprocessing == derived, ref
        seen = _recording(predictor)
        predictor.predict(image)  # whole image
        assert torch.equal(seen[-1], reference), ref
        seen.clear()
        predictor.probs(image, mode="whole", flip=True, scales=(1.0, 0.5))  # TTA views, through the windows code
        assert [tuple(x.shape[-2:]) for x in seen] == [SIZE] * 4
        assert torch.equal(seen[0], reference) and torch.equal(seen[1], reference.flip(-1)), ref
        half = derived.resize(image, (image.shape[0] // 2, image.shape[1] // 2))
        assert torch.equal(seen[2], _plain(plain, half)), ref
        seen.clear()
        predictor.probs(image, mode="slide")  # native windows of the spec's size
        assert seen and all(tuple(x.shape[-2:]) == SIZE for x in seen)
        first = _plain(plain, np.ascontiguousarray(image[: SIZE[0], : SIZE[1]]))
        assert torch.equal(seen[0][:1], first), ref  # the first window: its crop prepared as the whole image is

    # both parts of a segmentation + depth model follow it too
    joint = MultiTaskModule(config=dict(TINY), label_spec={"names": ["a", "b"]}, image_size=64)
    assert joint.preprocessing == derived
    state = {"state_dict": joint.state_dict(), "hyper_parameters": dict(joint.hparams)}
    joint.on_save_checkpoint(state)
    torch.save(state, tmp_path / "joint.ckpt")
    depth = DepthPredictor.load(str(tmp_path / "joint.ckpt"))
    assert depth.preprocessing == derived
    assert torch.equal(_plain(depth.processor, image), reference)


@needs(KITCHEN)
def test_depth_validation_follows_the_spec(derived):
    from dptune.data.depth_datamodule import DepthDataModule
    from dptune.tasks.depth import DepthModule

    frame = sorted((KITCHEN / "val" / "rgb").glob("*.jpg"))[0]
    module = DepthModule(config=dict(TINY), image_size=64)
    assert module.preprocessing == derived
    dm = DepthDataModule(root=str(KITCHEN), image_size=64, val_batch_size=1, depth_scale=1000, num_workers=0,
                         splits={"val": {"images": f"val/rgb/{frame.name}", "depth": "val/depth/{stem}.png"}})
    batches = _validate(module, dm)
    assert batches[0].shape == (1, 3, *SIZE)
    assert torch.equal(batches[0][0].permute(1, 2, 0), torch.from_numpy(
        derived.resize(np.asarray(Image.open(frame).convert("RGB")))))


def _third_party(tmp_path, name: str, **processor) -> str:
    """An export written by plain transformers (not by dptune), with its own processor settings."""
    from transformers import DPTConfig, DPTForSemanticSegmentation, DPTImageProcessorPil

    out = str(tmp_path / name)
    torch.manual_seed(0)
    DPTForSemanticSegmentation(DPTConfig(**{k: v for k, v in TINY.items() if k != "model_type"},
                                         num_labels=3)).save_pretrained(out)
    DPTImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3, **processor).save_pretrained(out)
    return out


def test_third_party_views_at_any_scale_are_prepared_as_transformers_does(tmp_path):
    """An Intel/dpt-large-style processor (aspect ratio kept, sides a multiple of 32) with LANCZOS:
    every whole-image view, alone or among test-time scales, is the processor's input for the
    (rescaled) image; the rescale uses the processor's own resample."""
    from dptune.inference.predictor import Predictor

    export = _third_party(tmp_path, "dpt-large-like", size={"height": 64, "width": 64}, keep_aspect_ratio=True,
                          ensure_multiple_of=32, resample=Image.Resampling.LANCZOS)
    predictor = Predictor.load(export)
    plain = _reference(export)
    image = np.random.default_rng(0).integers(0, 256, (90, 140, 3), dtype=np.uint8)
    reference = _plain(plain, image)
    assert reference.shape[-2:] == (64, 96)
    seen = _recording(predictor)
    alone = predictor.probs(image, mode="whole", flip=True)
    assert torch.equal(seen[0], reference) and torch.equal(seen[1], reference.flip(-1))
    seen.clear()
    twice = predictor.probs(image, mode="whole", flip=True, scales=(1.0, 1.0))
    assert len(seen) == 4 and all(torch.equal(x, reference.flip(-1) if i % 2 else reference)
                                  for i, x in enumerate(seen))
    assert torch.allclose(alone, twice, atol=1e-6)
    seen.clear()
    predictor.probs(image, mode="whole", scales=(0.5,))
    half = np.asarray(Image.fromarray(image).resize((70, 45), Image.Resampling.LANCZOS))
    assert torch.equal(seen[0], _plain(plain, half))
    assert predictor.preprocessing == Preprocessing((64, 64), (0.5,) * 3, (0.5,) * 3, "lanczos", "pil",
                                                    keep_aspect_ratio=True, ensure_multiple_of=32)
    assert predictor.preprocessing.output_size(90, 140) == (64, 96)


def test_padding_processor_pads_whole_views_never_windows(tmp_path):
    """do_pad / size_divisor: a whole-image view is padded as transformers pads it; a sliding
    window is rescaled and normalised only (a pad would move its logits off its place)."""
    from dptune.inference.predictor import Predictor

    export = _third_party(tmp_path, "padded", size={"height": 48, "width": 48}, do_pad=True, size_divisor=32)
    predictor = Predictor.load(export)
    plain = _reference(export)
    image = np.random.default_rng(1).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    seen = _recording(predictor)
    predictor.probs(image, mode="whole")
    assert seen[0].shape[-2:] == (64, 64) and torch.equal(seen[0], _plain(plain, image))
    seen.clear()
    probs = predictor.probs(image, mode="slide")
    assert probs.shape[-2:] == (60, 100) and all(tuple(x.shape[-2:]) == (48, 48) for x in seen)
    window = np.ascontiguousarray(image[:48, :48])
    assert torch.equal(seen[0][:1], _plain(plain, window, do_resize=False, do_pad=False))
    assert predictor.preprocessing.size_divisor == 32


OPTIONS = ({}, {"keep_aspect_ratio": True, "ensure_multiple_of": 32}, {"rescale_factor": 1 / 127.5},
           {"do_normalize": False}, {"size_divisor": 32})


@pytest.mark.parametrize("resample", RESAMPLES)
def test_a_processor_is_carried_whole(resample):
    """from_processor carries every setting that changes the model input, and processor() gives
    it back: a spec survives the round trip, and its own arithmetic is the processor's."""
    image = np.random.default_rng(2).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    for options in OPTIONS:
        spec = Preprocessing((48, 80), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), resample, "pil", **options)
        processor = spec.processor()
        assert Preprocessing.from_processor(processor) == spec, options
        if spec.size_divisor is None:  # pixel_values never pads (the benchmarks' loaders)
            assert torch.allclose(spec.pixel_values(image), _plain(processor, image), atol=1e-5), options


def test_a_processors_settings_are_read_not_dropped():
    from transformers import DPTImageProcessorPil

    for settings, expected in (
        ({"resample": Image.Resampling.LANCZOS}, {"resample": "lanczos"}),
        ({"resample": Image.Resampling.HAMMING}, {"resample": "hamming"}),
        ({"resample": Image.Resampling.BOX}, {"resample": "box"}),
        ({"do_normalize": False}, {"do_normalize": False}),
        ({"rescale_factor": 1 / 127.5}, {"rescale_factor": 1 / 127.5}),
        ({"keep_aspect_ratio": True, "ensure_multiple_of": 32}, {"keep_aspect_ratio": True, "ensure_multiple_of": 32}),
        ({"do_pad": True, "size_divisor": 32}, {"size_divisor": 32}),
    ):
        spec = Preprocessing.from_processor(DPTImageProcessorPil(size={"height": 64, "width": 64}, **settings))
        assert {k: getattr(spec, k) for k in expected} == expected, settings


def test_what_the_spec_cannot_express_is_refused_in_one_line(tmp_path):
    from transformers import BeitImageProcessorPil, DPTImageProcessorPil

    from dptune.inference.predictor import Predictor

    export = _third_party(tmp_path, "unsized", size={"shortest_edge": 64})
    with pytest.raises(ConfigError, match=f"^{export}: its image processor gives its size as"):
        Predictor.load(export)
    for processor, why in ((DPTImageProcessorPil(do_resize=False), "do_resize false"),
                           (DPTImageProcessorPil(size={"shortest_edge": 64}), "shortest_edge"),
                           (DPTImageProcessorPil(do_rescale=False), "do_rescale false"),
                           (BeitImageProcessorPil(), "BeitImageProcessorPil")):
        with pytest.raises(ConfigError, match=why) as e:
            Preprocessing.from_processor(processor, "somewhere/export")
        assert str(e.value).startswith("somewhere/export: ") and "\n" not in str(e.value)


def test_torchvision_resizes_with_transformers_interpolation(monkeypatch):
    """The torchvision backend resizes with the interpolation transformers' own mapping gives
    (PIL NEAREST is torchvision's NEAREST_EXACT, LANCZOS falls back to BICUBIC off the CPU or
    before torchvision 0.27). torchvision is not installed here: a stand-in records the call, and
    transformers' mapping is built from its own source against the stand-in's modes."""
    import enum
    import importlib.util

    import transformers.image_utils as image_utils
    import transformers.utils as hf_utils

    from dptune import preprocessing

    modes = enum.Enum("InterpolationMode", "NEAREST NEAREST_EXACT BOX BILINEAR HAMMING BICUBIC LANCZOS")
    calls = []
    functional = types.SimpleNamespace(
        resize=lambda image, size, interpolation, antialias: calls.append((interpolation, antialias)) or
        torch.zeros(*image.shape[:-2], *size, dtype=image.dtype))
    transforms = types.SimpleNamespace(InterpolationMode=modes, v2=types.SimpleNamespace(functional=functional))
    transforms_functional = types.SimpleNamespace(pil_to_tensor=None)
    for name, module in (("torchvision", types.SimpleNamespace(transforms=transforms)),
                         ("torchvision.transforms", transforms), ("torchvision.transforms.functional", transforms_functional),
                         ("torchvision.transforms.v2", transforms.v2), ("torchvision.transforms.v2.functional", functional)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(hf_utils, "is_torchvision_available", lambda: True)
    spec = importlib.util.spec_from_file_location("transformers.image_utils", image_utils.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)  # transformers' image_utils as it is with torchvision present
    monkeypatch.setattr(image_utils, "pil_torch_interpolation_mapping", fresh.pil_torch_interpolation_mapping)

    expected = {"nearest": "NEAREST_EXACT", "box": "BOX", "bilinear": "BILINEAR", "hamming": "HAMMING",
                "bicubic": "BICUBIC"}
    image = torch.zeros(1, 3, 20, 30, dtype=torch.uint8)
    for resample, mode in expected.items():
        calls.clear()
        Preprocessing((8, 12), backend="torchvision", resample=resample).resize(image)
        assert [(c[0].name, c[1]) for c in calls] == [(mode, True)], resample
        assert preprocessing.torchvision_interpolation(resample).name == mode
    monkeypatch.setattr("transformers.utils.import_utils.is_torchvision_greater_or_equal", lambda v: True)
    assert preprocessing.torchvision_interpolation("lanczos").name == "LANCZOS"
    assert preprocessing.torchvision_interpolation("lanczos", "cuda").name == "BICUBIC"
    monkeypatch.setattr("transformers.utils.import_utils.is_torchvision_greater_or_equal", lambda v: False)
    assert preprocessing.torchvision_interpolation("lanczos").name == "BICUBIC"


def test_a_window_and_the_whole_image_are_prepared_alike(derived):
    """An image the size of a window: sliding-window and whole-image inference feed the model the
    same tensor, and every view is resized by the spec's resample (not an antialiased bilinear of
    its own)."""
    from dptune.inference.predictor import Predictor
    from dptune.models import build_model

    model = build_model(["a", "b"], config=dict(TINY)).eval()
    predictor = Predictor(model, None, derived, torch.device("cpu"))
    image = np.random.default_rng(0).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    seen = _recording(predictor)
    predictor.probs(image, mode="whole")
    predictor.probs(image, mode="slide")
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    whole, slide = predictor.probs(image, mode="whole"), predictor.probs(image, mode="slide")
    assert torch.allclose(whole, slide, atol=1e-6)

    big = np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    if derived.backend == "pil":
        assert np.array_equal(derived.resize(big), np.asarray(Image.fromarray(big).resize(SIZE[::-1], Image.BILINEAR)))
    seen.clear()
    predictor.probs(big, mode="whole", scales=(1.0, 1.0))  # through the windows code: the view resized by the spec
    assert torch.equal(seen[0], predictor.pixel_values(big))
    assert torch.equal(derived.resize(torch.from_numpy(big).permute(2, 0, 1)), torch.from_numpy(
        derived.resize(big)).permute(2, 0, 1))  # arrays and tensors alike


def test_predictors_take_uint8_rgb_only(derived):
    """A float, grey or RGBA array is one clear error naming what is expected (no guess whether
    floats are 0-1 or 0-255)."""
    from transformers import DPTConfig, DPTForDepthEstimation

    from dptune.inference.depth_predictor import DepthPredictor
    from dptune.inference.predictor import Predictor
    from dptune.models import build_model

    predictor = Predictor(build_model(["a", "b"], config=dict(TINY)).eval(), None, derived, torch.device("cpu"))
    tiny = DPTConfig(**{k: v for k, v in TINY.items() if k != "model_type"})
    depth = DepthPredictor(DPTForDepthEstimation(tiny).eval(), derived.processor(), torch.device("cpu"))
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    for bad, why in ((rgb.astype(np.float32) / 255, "dtype float32"), (rgb[..., 0], r"shape \(20, 30\)"),
                     (np.zeros((20, 30, 4), np.uint8), r"shape \(20, 30, 4\)"), (Image.fromarray(rgb), "Image")):
        for call in (predictor.predict, lambda x: predictor.probs(x, scales=(1.0, 0.5)), depth.predict):
            with pytest.raises(ValueError, match=f"expected a uint8 HxWx3 RGB array, got .*{why}"):
                call(bad)


def test_the_task_and_the_loader_benchmark_resolve_one_normalisation(derived, tmp_path, monkeypatch):
    """loader_bench and the task resolve mean/std alike (one function, resolve_normalization): the
    settings, else the pretrained checkpoint's processor, else the family's statistics (DINOv2's
    are ImageNet's, not DPT's 0.5)."""
    import yaml
    from transformers import AutoModel, DPTImageProcessorPil

    from dptune.models.backbones import IMAGENET_MEAN, IMAGENET_STD
    from dptune.models.source import load_config
    from dptune.tasks.segmentation import SegmentationModule
    from dptune.tools.loader_bench import _preprocessing

    resolved = []  # (mean, std) each spec was built with, in order
    built = Preprocessing.of_task.__func__

    def of_task(cls, image_size, mean, std):
        resolved.append((tuple(mean), tuple(std)))
        return built(cls, image_size, mean, std)

    monkeypatch.setattr(Preprocessing, "of_task", classmethod(of_task))
    # configs/backbones/dinov2.yaml, its hub id replaced by a local bare backbone (no hub here)
    backbone = tmp_path / "dinov2"
    AutoModel.from_config(load_config("configs/models/dinov2-tiny-backbone.json")).save_pretrained(backbone)
    model = {**yaml.safe_load(open("configs/backbones/dinov2.yaml"))["model"], "pretrained": str(backbone)}

    def both(settings: dict) -> tuple:
        resolved.clear()
        task = {k: settings[k] for k in ("pretrained", "backbone", "image_mean", "image_std") if k in settings}
        SegmentationModule(label_spec={"names": ["a", "b"]}, image_size=56, **task)
        _preprocessing(settings, (56, 56))
        assert len(resolved) == 2 and resolved[0] == resolved[1], resolved  # the task's, the benchmark's
        return resolved[0]

    assert both(model) == (IMAGENET_MEAN, IMAGENET_STD)  # the family's, not DPT's 0.5
    assert both({**model, "image_mean": [0.1] * 3, "image_std": [0.2] * 3}) == ((0.1,) * 3, (0.2,) * 3)
    # a checkpoint's own processor comes before the family's statistics; x / 127.5 - 1 is (x / 255 - 0.5) / 0.5
    DPTImageProcessorPil(rescale_factor=1 / 127.5, image_mean=[1.0] * 3, image_std=[1.0] * 3).save_pretrained(backbone)
    assert both(model) == ((0.5,) * 3, (0.5,) * 3)
