"""Scoring an export on the images its serving graphs were measured on (``evaluate --held-back``):
the list its ``dptune.json`` records, and a folder source cut to them."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from dptune.export.serving_data import CalibrationError, relative_to


def held_back_images(model_dir: str | Path, task: str) -> tuple[str, list[str]]:
    """The data root and the images (relative to it) an export's serving graphs were measured on for
    ``task`` (its ``dptune.json``: ``serving.data.<task>``; of a joint export, its part's); one line when
    the export records none."""
    import json

    d = Path(model_dir)
    if not d.is_dir():
        raise CalibrationError(f"--held-back: {d} is not an exported directory; the held-back images are listed in "
                               "an export's dptune.json")
    for meta_path in (d / "dptune.json", d / task / "dptune.json"):
        if not meta_path.is_file():
            continue
        try:
            data = ((json.loads(meta_path.read_text()).get("serving") or {}).get("data") or {}).get(task) or {}
        except (OSError, ValueError, AttributeError):
            data = {}
        held = data.get("held_back") if isinstance(data, dict) else None
        if held:
            # a hand-edited list: a string is not a list of its letters, and an image listed twice was scored twice
            if not isinstance(held, list) or not all(isinstance(rel, str) and rel for rel in held):
                raise CalibrationError(f"{meta_path}: serving.data.{task}.held_back is not a list of image paths "
                                       f"(given {str(held)[:80]})")
            twice = sorted(rel for rel, n in Counter(held).items() if n > 1)
            if twice:
                raise CalibrationError(f"{meta_path}: serving.data.{task}.held_back lists {len(twice)} image(s) more "
                                       f"than once (first: {twice[0]}): each would be scored that many times")
            root = data.get("root")
            if root is not None and not isinstance(root, str):
                raise CalibrationError(f"{meta_path}: serving.data.{task}.root is not a folder path (given {root!r})")
            return str(root or "."), list(held)
    raise CalibrationError(f"--held-back: {d} records no held-back {task} images (export it with --int8, --onnx-fp16 "
                           "or --calibrate-temperature, which measure on them)")


def keep_held_back(source, source_root: str, model_dir: str | Path, task: str):
    """``source`` (a folder source of images and masks or depth maps) cut to the export's held-back
    ``task`` images, matched by their path relative to the data root (or the recorded root's file);
    one line when one of them is not in ``source``."""
    root, held = held_back_images(model_dir, task)
    want = {rel: i for i, rel in enumerate(held)}
    real = {os.path.realpath(os.path.join(root, rel)): rel for rel in held}
    keep: dict[str, int] = {}
    for i, image in enumerate(source.images):
        rel = relative_to(image, source_root)
        hit = rel if rel in want else real.get(os.path.realpath(image))
        if hit is not None and hit not in keep:
            keep[hit] = i
    missing = [rel for rel in held if rel not in keep]
    if missing:
        raise CalibrationError(f"--held-back: {len(missing)} of the {len(held)} held-back {task} images of {model_dir} "
                               f"are not among the images given (first: {missing[0]}, relative to {root})")
    order = [keep[rel] for rel in held]
    for attr in ("images", "masks", "depths"):
        values = getattr(source, attr, None)
        if values:
            setattr(source, attr, [values[i] for i in order])
    return source
