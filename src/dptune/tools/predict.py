"""Predict masks (segmentation models), depth maps (depth models) or both (segmentation + depth
models) for images.

    python scripts/predict.py --model OUT --images "photos/*.jpg" --out preds
    python scripts/predict.py --model DEPTH-OUT --images "frames/*.jpg" --out depth \
        --intrinsics ../shared/data/7scenes-kitchen/camera-intrinsics.txt
    python scripts/predict.py --model RUN/checkpoints/last.ckpt --images frame.jpg --out preds \
        --mode slide --flip --confidence --device cuda

For each image ``<stem>.png`` holds class indices (uint8, the model's id2label order),
``<stem>_overlay.png`` the prediction in the label colours blended on the image with a legend of
the classes present, and with ``--confidence`` ``<stem>_confidence.png`` the top-class
probability (black 0, white 1). Depth models: see ``dptune.tools.depth`` (16-bit depth PNGs in
millimetres, colourised maps, ``.ply`` point clouds with ``--intrinsics``; the whole image at one
scale, so ``--mode slide``, ``--scales`` and ``--confidence`` are refused; ``--flip`` averages the
left-right mirror). Segmentation + depth models write both sets of files and take every option:
``--mode``, ``--flip`` and ``--scales`` shape the masks as for a segmentation model, depth is the
depth model's (see ``dptune.tools.multitask``).

Inputs: a file, a folder (its images, extensions in any case) or a glob (``*.jpg`` takes ``.JPG``
too; ``.jpeg`` files beside the ones it takes are counted in a warning that offers ``*.jp*g``). Each image is read upright: its EXIF orientation applied as ``transformers``' ``pipeline``
applies it. ``<stem>`` is the file name without its extension; inputs from several folders keep
their folders below their common one (``a/x.jpg``, ``b/x.jpg`` -> ``OUT/a/x.png``, ``OUT/b/x.png``),
and inputs that would still share a name get the extension added (``x.jpg``, ``x.png`` -> ``x``,
``x_png``), so no prediction replaces another. An image that cannot be read or predicted is named
in one line and the rest go on; the exit status is then 2, with the count.

Inputs are never written: ``--out`` may not be an input, an input's folder or inside one (refused in
one line before anything is written). ``OUT/dptune-predict.json`` lists the files predict wrote
there; those are replaced by a later run, any other file in the way stops the run before
anything is written unless ``--overwrite`` is given. Every file is written beside its place and
then moved into it: a link found in ``--out`` at an output's name (to an input, say) is replaced,
never written through. Loading a model never runs code shipped with
it unless ``--trust-remote-code`` is given (dptune's own exports never need it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from dptune.data.sources import glob_files, read_image, spelling_note
from dptune.errors import ConfigError, DataError
from dptune.inference import FLIP_VIEWS
from dptune.labels import LabelSet

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# every file name predict may derive from a stem: two inputs never share one (see ``output_stems``)
OUTPUT_SUFFIXES = (".png", "_overlay.png", "_confidence.png", "_depth.png", "_depth.tiff", "_depth_color.png", ".ply")
MANIFEST = "dptune-predict.json"  # in --out: the files predict wrote there (what a later run may replace)


def list_images(spec: str) -> list[str]:
    """A file, a folder (its images, the extension in any case) or a glob (the extension in any case)."""
    if os.path.isdir(spec):
        return sorted(str(p) for p in Path(spec).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if os.path.isfile(spec):
        return [spec]
    found = glob_files(spec)
    if not found:
        note = spelling_note(spec, [])
        raise DataError(f"{spec}: no images found" + (f"; {note}" if note else ""))
    return found


def output_stems(paths: list[str]) -> list[str]:
    """Where each input's outputs go below ``--out``, without the suffix: the input's path below
    the common folder of all inputs, without its extension (one folder: the bare stem). Inputs that
    would still share an output file (``x.jpg`` and ``x.png``; ``x.jpg`` and ``x_overlay.jpg``;
    names equal but for case, which a case-insensitive disk cannot tell apart) get their extension
    added, then a number: no prediction ever replaces another's."""
    absolute = [os.path.abspath(p) for p in paths]
    base = os.path.commonpath([os.path.dirname(p) for p in absolute]) if absolute else ""
    taken: set[str] = set()
    stems = []
    for p in absolute:
        root, ext = os.path.splitext(os.path.relpath(p, base))
        tagged = f"{root}_{ext.lstrip('.')}" if ext else root
        for stem in itertools.chain([root, tagged], (f"{tagged}_{n}" for n in itertools.count(2))):
            names = {(stem + s).casefold() for s in OUTPUT_SUFFIXES}
            if not names & taken:
                break
        taken |= names
        stems.append(stem)
    return stems


def refuse_among_inputs(target: str | Path, files: Iterable[str | Path], flag: str,
                        folders: Iterable[str | Path] = (), singles: Iterable[str | Path] = ()) -> None:
    """An output path (``flag`` names the option) that is an input (one of ``files``: data; of
    ``singles``: a config, a label file, a checkpoint), the folder of one of ``files``, one of
    ``folders`` (an exported model) or inside such a folder stops here in one line: the inputs and
    their folders stay byte-for-byte as they were."""
    t = Path(target).resolve()
    data = {Path(f).resolve() for f in files}
    if t in data | {Path(f).resolve() for f in singles}:
        raise ConfigError(f"{flag} {target}: is one of the inputs; it would be overwritten. Write to another path")
    for d in sorted({f.parent for f in data} | {Path(d).resolve() for d in folders}):
        if t == d or d in t.parents:
            raise ConfigError(f"{flag} {target}: {'is' if t == d else 'is inside'} {d}, a folder of the inputs; "
                              "dptune never writes among its inputs (it would add files to that folder, or "
                              "replace some). Write to a folder of its own")


def config_inputs(config: str | Path | None, root: str | None = None) -> list[Path]:
    """The config file and every file it names: any string in it (at any depth: ``data.labels``,
    ``model.pretrained``, a class-weights file, ...) that is the path of an existing file, relative
    to the working folder, the config's folder, ``root`` (``--root``) or any ``root`` the config
    sets (``data.root``, ``data.segmentation.root``, ...). Inputs all: an output may not be one."""
    import yaml

    if not config:
        return []
    try:
        with open(config) as f:
            spec = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return [Path(config)]
    strings: list[str] = []
    roots: list[str] = [root] if root else []

    def walk(node: object, key: object = None) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str) and node:
            strings.append(node)
            if key == "root":
                roots.append(node)

    walk(spec)
    bases = [Path("."), Path(config).parent, *(Path(os.path.expanduser(r)) for r in roots)]
    found = [Path(config)]
    for s in strings:
        p = Path(os.path.expanduser(s))
        for candidate in ([p] if p.is_absolute() else [b / p for b in bases]):
            try:
                if candidate.is_file():
                    found.append(candidate)
            except (OSError, ValueError):  # a name too long, a NUL: not a file
                pass
    return found


def model_paths(model: str) -> tuple[list[Path], list[Path]]:
    """The folders and files of a local model that outputs must stay out of: an exported directory
    (and everything in it); a checkpoint. A hub id has none."""
    path = Path(model)
    if path.is_dir():
        return [path], []
    if path.is_file():
        return [], [path]
    return [], []


def refuse_out_among_inputs(out: str, paths: list[str], stems: list[str], model: str | None = None) -> None:
    """``--out``, and every folder below it that the outputs go to, outside the inputs and their
    folders, outside an exported model's folder, and not the folder a checkpoint lies in (a run's
    checkpoints: a folder next to it, ``./preds`` beside ``./model.ckpt``, is fine)."""
    folders, singles = model_paths(model) if model else ([], [])
    refuse_among_inputs(out, paths, "--out", folders=folders, singles=singles)
    if singles and Path(out).resolve() == singles[0].resolve().parent:
        raise ConfigError(f"--out {out}: is the folder of the checkpoint {model}; predictions would mix with "
                          "the run's checkpoints. Write them to a folder of their own")
    for sub in sorted({os.path.dirname(s) for s in stems} - {""}):
        try:
            refuse_among_inputs(Path(out) / sub, paths, "--out", folders=folders, singles=singles)
        except ConfigError:
            raise ConfigError(f"--out {out}: the predictions of the inputs in {sub}/ would go to {Path(out) / sub}, "
                              "a folder of the inputs; write them to a folder of their own") from None


def _manifest(out: Path) -> set[str]:
    """The files a previous run listed in ``OUT/dptune-predict.json``; a file of that name that is
    not such a list stops the run (it is the user's)."""
    path = out / MANIFEST
    if not path.exists():
        return set()
    try:
        spec = json.loads(path.read_text())
        files = spec["files"] if spec.get("written_by") == "dptune predict" else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        files = None
    if not isinstance(files, list):
        raise ConfigError(f"{path}: already there and not dptune's list of its predictions; predict into another "
                          "folder")
    return {str(f) for f in files}


def prepare_out(out: str | Path, planned: list[str], overwrite: bool = False) -> Path:
    """The output folder, made, its list of predict's files (``MANIFEST``) updated with ``planned``
    (file names below it) before any is written. A planned file already there that predict did not
    write (not in the list) stops the run in one line unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder")
    ours = _manifest(out)
    foreign = [f for f in planned if f not in ours and (out / f).exists()]
    if foreign and not overwrite:
        raise ConfigError(f"--out {out}: {len(foreign)} file(s) there that predict did not write would be "
                          f"overwritten (first: {out / foreign[0]}); predict into another folder, or give "
                          "--overwrite")
    for folder in sorted({(out / f).parent for f in planned} | {out}):
        folder.mkdir(parents=True, exist_ok=True)
    write_text(out / MANIFEST, json.dumps({"written_by": "dptune predict", "files": sorted(ours | set(planned))},
                                          indent=1) + "\n")
    return out


def write_replacing(path: str | Path, write: Callable[[str], object]) -> None:
    """Write the file at ``path`` by replacing its directory entry, never by writing into the file
    already there: ``write(tmp)`` writes a new file beside it (same folder, same extension, so that
    writers that go by the extension keep their format), which ``os.replace`` then puts in its
    place. A symbolic or hard link found at ``path`` (to an input, say) is replaced, and what it
    pointed to stays as it was; a write that fails leaves ``path`` untouched and no temporary file
    behind. The one way predict, evaluate and inspect write their outputs."""
    import secrets

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp{path.suffix}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    """A text file written by ``write_replacing``."""
    write_replacing(path, lambda tmp: Path(tmp).write_text(text))


def imwrite(path: Path, array: np.ndarray) -> None:
    """``cv2.imwrite`` (through ``write_replacing``) that fails loudly (it returns False on a full
    disk or a bad path)."""

    def write(tmp: str) -> None:
        if not cv2.imwrite(tmp, array):
            raise DataError(f"{path}: could not be written")

    write_replacing(path, write)


def predict_each(paths: list[str], stems: list[str], desc: str,
                 one: Callable[[str, str, np.ndarray], None]) -> list[str]:
    """``one(path, stem, image)`` for each input, with a progress bar; an image that cannot be read
    (empty, damaged, not an image) or predicted is named in one line and the others go on. Returns
    the inputs that failed."""
    failed: list[str] = []
    for path, stem in tqdm(list(zip(paths, stems, strict=True)), desc=desc):
        try:
            one(path, stem, read_image(path))
        except (ValueError, RuntimeError, OSError, cv2.error) as e:  # DataError is a ValueError
            lines = str(e).strip().splitlines()  # OpenCV's reason is its last line
            why = (lines[-1] if isinstance(e, cv2.error) else lines[0]) if lines else type(e).__name__
            tqdm.write(f"error: {why if why.startswith(path) else f'{path}: {why}'}", file=sys.stderr)  # own line
            failed.append(path)
    return failed


def failures(failed: list[str], total: int) -> int:
    """The exit status, with one line that counts the failures (each was named as it happened)."""
    if not failed:
        return 0
    print(f"error: {len(failed)} of {total} images could not be predicted (each named above, first {failed[0]}); "
          f"the other {total - len(failed)} were predicted", file=sys.stderr)
    return 2


def overlay(image: np.ndarray, pred: np.ndarray, labels: LabelSet, alpha: float = 0.5) -> np.ndarray:
    """The prediction in label colours blended on the image, a legend of present classes on the right."""
    color = labels.colorize(pred)
    blend = (image.astype(np.float32) * (1 - alpha) + color.astype(np.float32) * alpha).astype(np.uint8)
    present = [int(c) for c in np.unique(pred) if c < labels.num_classes]
    row = 22
    width = 16 + 9 * max((len(labels.names[c]) for c in present), default=4) + 30
    legend = np.full((max(blend.shape[0], row * len(present) + 10), width, 3), 255, np.uint8)
    for k, c in enumerate(present):
        y = 8 + k * row
        cv2.rectangle(legend, (8, y), (24, y + 14), tuple(int(v) for v in labels.colors[c]), -1)
        cv2.rectangle(legend, (8, y), (24, y + 14), (0, 0, 0), 1)
        cv2.putText(legend, labels.names[c], (30, y + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    canvas = np.full((legend.shape[0], blend.shape[1] + width, 3), 255, np.uint8)
    canvas[: blend.shape[0], : blend.shape[1]] = blend
    canvas[:, blend.shape[1]:] = legend
    return canvas


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def mask_files(stem: str, confidence: bool) -> list[str]:
    """What ``write_masks`` writes for one input."""
    return [f"{stem}.png", f"{stem}_overlay.png"] + ([f"{stem}_confidence.png"] if confidence else [])


def write_masks(out: Path, stem: str, image: np.ndarray, pred: np.ndarray, conf: np.ndarray, labels: LabelSet,
                args: argparse.Namespace) -> None:
    """``<stem>.png``, ``<stem>_overlay.png`` and, with ``--confidence``, ``<stem>_confidence.png``."""
    imwrite(out / f"{stem}.png", pred)
    write_rgb(out / f"{stem}_overlay.png", overlay(image, pred, labels, args.alpha))
    if args.confidence:
        imwrite(out / f"{stem}_confidence.png", (conf * 255).round().astype(np.uint8))


SCALE_RANGE = (0.125, 4.0)  # beyond: views of a few pixels, or of a size no memory holds


def parse_scales(spec: str) -> tuple[float, ...]:
    """``--scales``: comma-separated factors within ``SCALE_RANGE``."""
    try:
        scales = tuple(float(s) for s in spec.split(","))
    except ValueError:
        scales = ()
    lo, hi = SCALE_RANGE
    if not scales or not all(lo <= s <= hi for s in scales):  # NaN and inf fail too
        raise ConfigError(f"--scales {spec!r}: give comma-separated factors from {lo:g} to {hi:g}, e.g. 0.75,1,1.25")
    return scales


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="dptune .ckpt or exported directory")
    ap.add_argument("--images", required=True, help="an image file, a folder or a glob (extensions in any case)")
    ap.add_argument("--out", required=True, help="output folder: not an input, nor an input's folder or inside one")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace files in --out that predict did not write (its own, listed in "
                         f"{MANIFEST}, are always replaced); without it such a file stops the run")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="allow a model whose config asks for code shipped with it (auto_map) to run that code; "
                         "never needed for dptune's exports")
    ap.add_argument("--mode", choices=["whole", "slide"], default="whole",
                    help="masks: whole image or sliding windows (depth: whole image only)")
    ap.add_argument("--flip", nargs="?", const="h", default="none", choices=list(FLIP_VIEWS),
                    help="flip TTA: h, hv (also up-down) or d4 (also 90-degree turns); bare --flip = h. "
                         "Depth averages only the left-right mirror")
    ap.add_argument("--scales", default="1", help="masks: comma-separated scales to average (depth: 1 only)")
    ap.add_argument("--confidence", action="store_true", help="also write the top-class probability (masks)")
    ap.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--intrinsics", help="depth and segmentation + depth models: fx,fy,cx,cy or a 3x3 camera "
                                         "matrix file; writes <stem>.ply")
    args = ap.parse_args(argv)
    from dptune.predictor import Predictor
    from dptune.tools.depth import model_task, predict_depth

    try:
        paths = list_images(args.images)
        stems = output_stems(paths)
        refuse_out_among_inputs(args.out, paths, stems, args.model)
        task = model_task(args.model)
        if task == "depth":
            return predict_depth(args, paths, stems)
        if task == "multitask":
            from dptune.tools.multitask import predict_both

            return predict_both(args, paths, stems)
        scales = parse_scales(args.scales)
        if args.intrinsics:
            raise ConfigError("--intrinsics: point clouds need depth; this is a segmentation model")
        predictor = Predictor.load(args.model, args.device, trust_remote_code=args.trust_remote_code)
        out = prepare_out(args.out, [f for s in stems for f in mask_files(s, args.confidence)], args.overwrite)
    except (DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def one(path: str, stem: str, image: np.ndarray) -> None:
        pred, conf = predictor.predict(image, mode=args.mode, flip=args.flip, scales=scales)
        write_masks(out, stem, image, pred, conf, predictor.labels, args)

    failed = predict_each(paths, stems, "predicting", one)
    print(f"{len(paths) - len(failed)} predictions in {out}")
    return failures(failed, len(paths))


if __name__ == "__main__":
    sys.exit(main())
