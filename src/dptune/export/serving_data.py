"""The images an export calibrates and measures its serving graphs on.

The run's validation split (read from its ``config.yaml``, which sits beside ``checkpoints/``, or
from ``--data CONFIG``) is cut in two where something is fitted on it: a *fit* part (up to ``count``
images, evenly spaced, so a split of video frames is sampled end to end; a joint model's ``count``
is split between its tasks when both fit) that calibrates INT8 activations and, on segmentation,
fits the temperature, and the *held-back* rest, on which each graph and the temperature are scored
against the fp32 torch model. ``--calibration-images GLOB`` replaces the fit parts as INT8
calibration data (its images are then left out of the held-back part too); a split nothing is
fitted on (depth beside a temperature, every split of an fp16-only export) is all held back.

Images are prepared exactly as the exported image processor prepares them (``pixel_values``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from dptune.errors import ConfigError, DataError
from dptune.export.calibration_images import MIN_IMAGES, CalibrationError, glob_images, same_content, spread

DEFAULT_COUNT = 32  # "a few dozen"
MAX_HELD = 100  # held-back images scored per task (the measurement's time stays in seconds on a CPU)


@dataclass
class TaskData:
    """One task's validation split: a folder source and which of its images fit / are held back."""

    task: str  # "segmentation" or "depth"
    source: object  # FolderSource / DepthFolderSource
    fit: list[int] = field(default_factory=list)
    held: list[int] = field(default_factory=list)
    root: str = "."  # the data root the split's paths are relative to
    section: dict = field(default_factory=dict)  # the config's data section of this task (evaluate's options)
    labels: object = None  # segmentation: the source's own label set (its ignore values), in the model's classes

    def image(self, i: int) -> str:
        return self.source.images[i]

    def relative(self, indices: list[int]) -> list[str]:
        """The images ``indices`` as paths relative to the data root (as the config names them)."""
        return [relative_to(self.image(i), self.root) for i in indices]


def relative_to(path: str, root: str) -> str:
    """``path`` relative to ``root`` when it lies under it, else absolute (POSIX separators)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return Path(os.path.abspath(path)).as_posix() if rel.startswith("..") else Path(rel).as_posix()


@dataclass
class ServingData:
    """Calibration images (paths) and each task's validation split, cut into fit and held-back."""

    calibration: list[str]
    tasks: dict[str, TaskData]
    where: str  # where the split was read from (the card says it)
    glob: str | None = None


def run_config(src: str) -> Path | None:
    """The ``config.yaml`` a dptune run wrote beside its ``checkpoints/`` folder, if there is one."""
    p = Path(src)
    if p.is_file():
        for d in (p.parent, p.parent.parent):
            if (d / "config.yaml").is_file():
                return d / "config.yaml"
    return None


def _data_section(config: Path) -> tuple[str, dict]:
    """The task a train.py config trains (its ``task:``, segmentation by default; a data section with
    segmentation and depth parts is a joint one) and its data section."""
    try:
        raw = yaml.safe_load(config.read_text()) or {}
        data = raw.get("data")
    except (yaml.YAMLError, AttributeError, OSError) as e:
        raise CalibrationError(f"{config}: not a readable train.py config ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"{config}: no data: section naming a validation split")
    data = data.get("init_args", data) if "class_path" in data else data
    task = raw.get("task") if isinstance(raw.get("task"), str) else None
    if task is None:
        task = "multitask" if isinstance(data.get("segmentation"), (dict, list)) else "segmentation"
    return task, data


TASK_NAMES = {"segmentation": "segmentation", "depth": "depth", "multitask": "joint segmentation + depth"}
TASK_DATA = {"segmentation": "whose data: section names a validation split of images and masks",
             "depth": "whose data: section names a validation split of images and depth maps",
             "multitask": "with data.segmentation and data.depth sections (as configs/multitask/camvid-7scenes.yaml)"}


def check_config_task(config_task: str, task: str, where: str) -> None:
    """One line when the config trains another task than the model's (a depth config for a
    segmentation model)."""
    if config_task != task:
        raise CalibrationError(f"{where}: a {TASK_NAMES.get(config_task, config_task)} config (task: {config_task}), "
                               f"but the model is a {TASK_NAMES[task]} model: give a {TASK_NAMES[task]} config "
                               f"{TASK_DATA[task]}")


def source_labels(section: dict, model_labels, joint: bool, where: str):
    """The segmentation source's own label set (its mask format and ignore values), in the model's
    classes: the same classes as the model's (a single-task export, as evaluate requires), or for a
    joint model classes it has, mapped by name (as joint training maps each source)."""
    from dptune.labels import check_same_classes, load_labels

    try:
        labels = load_labels(section.get("labels", "labels.yaml"), str(section.get("root") or "."),
                             where=f"{where}: data.labels")
    except (DataError, ConfigError) as e:
        raise CalibrationError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    if model_labels is None:
        return labels
    model, names = list(model_labels.names), list(labels.names)
    if [n.lower() for n in model] == [n.lower() for n in names]:
        return labels
    if joint:
        try:
            return labels.retarget(model, getattr(model_labels, "colors", None))
        except ConfigError as e:
            raise CalibrationError(f"{where}: its label set does not fit the model: {e}") from None
    try:
        check_same_classes(model, names)
    except DataError as e:
        both = f" (model: {model}, labels: {names})" if len(model) != len(names) else ""
        raise CalibrationError(f"{where}: its label set does not match the model's: {e}{both}; give a config "
                               "with the model's label set") from None
    return labels


def check_readable(part: TaskData, where: str) -> None:
    """Read what the slow steps will read, before they start: every mask of the fit and held-back
    images (shape, values, size against its image's) through the source's label set; a depth
    split's first held-back map."""
    from dptune.data.dataset import encode_mask, read_sample

    try:
        if part.task == "segmentation":
            for i in dict.fromkeys([*part.fit, *part.held]):
                _, image_hw, mask, name = read_sample(part.source, i, decode_image=False)
                encode_mask(mask, name, part.labels, image_hw)
        elif part.held:
            part.source.load(part.held[0])
    except DataError as e:
        raise CalibrationError(f"{where}: {e}") from None


def check_folder_data(data: dict, task: str, config: Path) -> None:
    """The images calibrated on and measured are a folder split's: a config of synthetic shapes (the
    quickstart's) or of a Hugging Face dataset is one line saying what to give instead, before its
    label file is looked for (the quickstart has none)."""
    kind = data.get("source", "folder")
    if kind == "folder" and not data.get("hf"):
        return
    what = "synthetic shapes (data.source: synthetic)" if kind == "synthetic" else "a Hugging Face dataset"
    raise CalibrationError(f"{config}: the {task} data is {what}, not a folder split; give --data CONFIG naming a "
                           "folder validation split")


def _val_source(data: dict, task: str, config: Path, split: str = "val", rgb_masks: bool = False):
    """A folder source of the config's validation split for ``task``."""
    from dptune.data.depth import DepthFolderSource
    from dptune.data.sources import FolderSource

    splits = data.get("splits") or {}
    check_folder_data(data, task, config)
    if split not in splits:
        raise CalibrationError(f"{config}: no {split!r} split in the {task} data (splits: {', '.join(splits) or 'none'})")
    spec, root = splits[split], str(data.get("root") or ".")
    if not Path(root).is_dir():
        raise CalibrationError(f"{config}: data root {root} not found from {Path.cwd()} (run export where training "
                               "ran, or give --data CONFIG with a root that resolves here)")
    try:
        if task == "depth":
            return DepthFolderSource(root, spec["images"], spec["depth"], scale=data.get("depth_scale"))
        return FolderSource(root, spec["images"], spec["masks"], rgb_masks)
    except KeyError as e:
        raise CalibrationError(f"{config}: the {split} split of the {task} data has no {e.args[0]!r}") from None
    except DataError as e:
        raise CalibrationError(f"{config}: {e}") from None


def cut(source, count: int, task: str, where: str) -> TaskData:
    """``source`` cut into up to ``count`` fit images (0: none, nothing is fitted on this split) and
    up to ``MAX_HELD`` of the rest, held back for the measurement."""
    n = len(source)
    need = 2 * MIN_IMAGES if count else MIN_IMAGES
    if n < need:
        raise CalibrationError(f"{where}: the {task} validation split has {n} image{'s' if n != 1 else ''}; "
                               f"{'calibrating and ' if count else ''}measuring needs at least {need}")
    fit = spread(n, min(count, n // 2)) if count else []
    rest = [i for i in range(n) if i not in set(fit)]
    return TaskData(task, source, fit, [rest[i] for i in spread(len(rest), MAX_HELD)])


def fitted_tasks(task: str, int8: bool, pattern: str | None, temperature: bool) -> list[str]:
    """The tasks whose validation split gives a fit part: every task's when INT8 calibrates on the
    splits (``int8`` without a ``pattern``), segmentation's when a temperature is fitted; the other
    splits are all measurement."""
    tasks = ["segmentation", "depth"] if task == "multitask" else [task]
    return [t for t in tasks if (int8 and not pattern) or (temperature and t == "segmentation")]


def serving_data(src: str, task: str, data_config: str | None = None, pattern: str | None = None,
                 count: int = DEFAULT_COUNT, int8: bool = True, temperature: bool = False,
                 labels=None) -> ServingData:
    """The calibration images and validation splits of an export of ``task`` (segmentation, depth,
    multitask) from ``src``: its run's ``config.yaml`` unless ``data_config`` names another. A split
    is cut into a fit part and a held-back part only where something is fitted on it (see
    ``fitted_tasks``); the held-back part never holds an image of ``pattern``. ``labels``: the
    model's label set, which the config's must match (a joint model: contain); the masks are read
    with the config's (its ignore values). Checked here, before any slow step: the config's task,
    its label set, and every mask that will be read.

    ``count`` bounds the fit images in all: split between a joint model's tasks when both fit (the
    odd one to segmentation), each needing ``MIN_IMAGES``; the images of a ``pattern`` are ``count``
    at most."""
    if count < MIN_IMAGES:
        raise CalibrationError(f"--calibration-count {count}: calibration needs at least {MIN_IMAGES} images")
    fitted = fitted_tasks(task, int8, pattern, temperature)
    if len(fitted) == 2 and count < 2 * MIN_IMAGES:
        raise CalibrationError(f"--calibration-count {count}: a joint model's fit images are split between its two "
                               f"tasks' validation splits, at least {MIN_IMAGES} each: give at least {2 * MIN_IMAGES}")
    config = Path(data_config) if data_config else run_config(src)
    if config is None:
        raise CalibrationError(f"{src}: no run config.yaml beside it to find the validation split; give --data "
                               "CONFIG (a train.py config whose data: section names a val split)")
    if not config.is_file():
        raise CalibrationError(f"--data {config}: not found")
    where = f"--data {config}" if data_config else str(config)
    config_task, data = _data_section(config)
    check_config_task(config_task, task, where)
    parts = {"segmentation": data.get("segmentation"), "depth": data.get("depth")} if task == "multitask" else {task: data}
    tasks = {}
    for t, section in parts.items():
        if not isinstance(section, dict):
            raise CalibrationError(f"{config}: no data.{t} section for the joint model's {t} split")
        # at most ``count`` in all, as the option says: split between a joint model's tasks when both fit
        share = (0 if t not in fitted else count if len(fitted) == 1
                 else count - count // 2 if t == "segmentation" else count // 2)
        check_folder_data(section, t, config)
        own = source_labels(section, labels, task == "multitask", where) if t == "segmentation" else None
        rgb = own is not None and own.mask_format == "rgb"
        tasks[t] = cut(_val_source(section, t, config, rgb_masks=rgb), share, t, str(config))
        tasks[t].root, tasks[t].section, tasks[t].labels = str(section.get("root") or "."), section, own
    if pattern:
        calibration = glob_images(pattern, count)
        chosen, same = {os.path.realpath(p) for p in calibration}, same_content(calibration)
        for d in tasks.values():  # the held-back images are never calibration ones, nor copies of them
            pool = [i for i in range(len(d.source)) if i not in set(d.fit)]
            held = [i for i in pool if os.path.realpath(d.image(i)) not in chosen and not same(d.image(i))]
            d.held = [held[i] for i in spread(len(held), MAX_HELD)]
            if len(d.held) < MIN_IMAGES:
                raise CalibrationError(f"--calibration-images {pattern}: leaves {len(d.held)} held-back {d.task} "
                                       f"image{'s' if len(d.held) != 1 else ''} of {config} to measure on (at least "
                                       f"{MIN_IMAGES}); leave more validation images out of it")
    else:
        calibration = [d.image(i) for d in tasks.values() for i in d.fit] if int8 else []
    for d in tasks.values():
        check_readable(d, where)
    return ServingData(calibration, tasks, os.path.abspath(config), pattern)  # the card's command runs from anywhere


def prepare(processor, path_or_image) -> np.ndarray:
    """``pixel_values`` (1, 3, H, W) float32 of one image, as the exported image processor makes them
    (the image read upright, as ``pipeline`` reads it)."""
    from dptune.data.images import read_image

    image = read_image(path_or_image) if isinstance(path_or_image, (str, Path)) else path_or_image
    # channels_last said: transformers guesses the axis of an array 1-4 pixels tall (a 3 x 200 strip was read channels-first)
    return np.asarray(processor(images=image, return_tensors="np", input_data_format="channels_last")["pixel_values"],
                      dtype=np.float32)
