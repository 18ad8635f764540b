"""One preprocessing definition: the spec a task builds (``Preprocessing.of_task``) is what
validation, whole-image and sliding-window inference, test-time views, both predictors and the
exported processor prepare images by. Each test changes the spec in that one place (size, mean,
std and resample all unlike the task's settings) and watches every path follow it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import CAMVID, TINY, needs
from PIL import Image

from dptune.preprocessing import Preprocessing

SIZE, MEAN, STD = (48, 48), (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
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


@needs(CAMVID)
def test_every_path_follows_the_spec(derived, tmp_path):
    import lightning.pytorch as pl

    from dptune.data.datamodule import SegmentationDataModule
    from dptune.export import export
    from dptune.inference.depth_predictor import DepthPredictor
    from dptune.inference.predictor import Predictor
    from dptune.tasks.multitask import MultiTaskModule
    from dptune.tasks.segmentation import SegmentationModule

    torch.manual_seed(0)
    image = _image()
    labels = {"names": [f"c{i}" for i in range(11)]}

    # validation: the loader resizes by the task's spec, the module normalises by it
    module = SegmentationModule(config=dict(TINY), label_spec=labels, image_size=64)
    assert module.preprocessing == derived
    dm = SegmentationDataModule(root=str(CAMVID), labels="labels.yaml", image_size=64, val_batch_size=1,
                                splits={"val": {"images": f"val/{FRAME.name}", "masks": "valannot/{stem}.png"}},
                                check=False, num_workers=0)
    batches = []

    class Grab(pl.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, *args) -> None:
            batches.append(batch["image"].clone())

    pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[Grab()]).validate(module, datamodule=dm, verbose=False)
    assert batches[0].shape == (1, 3, *SIZE)
    validation_input = module.normalize(batches[0])

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


def test_benchmarks_normalise_with_the_models_spec(derived):
    """The HF baseline of ``benchmark`` and the PIL loader of ``loader_bench`` read the spec, not a
    hard-coded 0.5/0.5."""
    from dptune.tools.loader_bench import _preprocessing

    prep = _preprocessing({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5]}, (64, 64))
    assert prep == derived  # built by the one constructor
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(prep.pixel_values(x, resize=False)[0, :, 0, 0],
                          (1 - torch.tensor(MEAN)) / torch.tensor(STD))
