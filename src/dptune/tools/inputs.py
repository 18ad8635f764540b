"""What the tools read, and keeping their outputs out of it: the input images, the files a config
names, the model's folder or file; an output path that is one of them or lies among them is refused
in one line. Also the options the tools share (``--scales``) and what a model reference holds."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from dptune.data.globs import glob_files, spelling_note
from dptune.data.images import IMAGE_EXTS
from dptune.errors import ConfigError, DataError
from dptune.models.folders import refuse_model_folders

log = logging.getLogger(__name__)

def list_images(spec: str) -> list[str]:
    """A file, a folder (its images, the extension in any case; what else it holds, sub-folders
    included, is counted in one warning) or a glob (the extension in any case)."""
    if os.path.isdir(spec):
        found, left = [], []
        for p in sorted(Path(spec).iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
                found.append(str(p))
            else:
                left.append(entry_name(p))
        shown = ", ".join(left[:3]) + (", ..." if len(left) > 3 else "")
        entries = f"{len(left)} {'entry' if len(left) == 1 else 'entries'}"
        if not found:
            raise DataError(f"no images found in {spec}" + (f": {entries}, none an image ({shown})"
                                                             if left else " (an empty folder)"))
        if left:
            log.warning("%s: %s not read as images (%s; images are %s); sub-folders are not searched: "
                        "give a glob such as '%s' to read them", spec, entries, shown, " ".join(IMAGE_EXTS),
                        os.path.join(spec, "**", "*"))
        return found
    if os.path.isfile(spec):
        return [spec]
    found = glob_files(spec)
    if not found:
        note = spelling_note(spec, [])
        raise DataError(f"{spec}: no images found" + (f"; {note}" if note else ""))
    return found


def shown(path: str) -> str:
    """``path`` on one line: a name with a newline (or another unprintable character) escaped."""
    return path if path.isprintable() else repr(path)[1:-1]


def entry_name(p: Path) -> str:
    """A folder entry as a message shows it, on one line: a folder with a trailing /, a link to nothing
    said so, a name with a newline (or another unprintable character) escaped."""
    name = shown(p.name)
    if p.is_dir():
        return name + "/"
    return name + (" (a broken link)" if p.is_symlink() and not p.exists() else "")


def refuse_among_inputs(target: str | Path, files: Iterable[str | Path], flag: str,
                        folders: Iterable[str | Path] = (), singles: Iterable[str | Path] = ()) -> None:
    """An output path (``flag`` names the option) that is an input (one of ``files``: data; of
    ``singles``: a config, a label file, a checkpoint), the folder of one of ``files``, one of
    ``folders`` (an exported model's) or inside such a folder stops here in one line: the inputs and
    their folders stay byte-for-byte as they were."""
    t = Path(target).resolve()
    data = {Path(f).resolve() for f in files}
    if t in data | {Path(f).resolve() for f in singles}:
        raise ConfigError(f"{flag} {target}: is one of the inputs; it would be overwritten. Write to another path")
    models = {Path(d).resolve() for d in folders}
    for d in sorted({f.parent for f in data} | models):
        if t == d or d in t.parents:
            what = f"the folder of the model {d}" if d in models else f"{d}, a folder of the inputs"
            raise ConfigError(f"{flag} {target}: {'is' if t == d else 'is inside'} {what}; dptune never writes among "
                              "its inputs (it would add files to that folder, or replace some). Write to a folder "
                              "of its own")


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
    folders, outside an exported model's folder (any, see ``refuse_model_folders``), and not the
    folder a checkpoint lies in (a run's checkpoints: a folder next to it, ``./preds`` beside
    ``./model.ckpt``, is fine)."""
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
    refuse_model_folders(out)
    for sub in sorted({os.path.dirname(s) for s in stems} - {""}):
        refuse_model_folders(Path(out) / sub)


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
    twice = next((s for i, s in enumerate(scales) if s in scales[:i]), None)
    if twice is not None:  # the same view run twice and averaged with itself
        raise ConfigError(f"--scales {spec!r}: {twice:g} is given twice; give each scale once")
    return scales


def small_text(path: str | Path, limit: int = 16 << 20) -> str | None:
    """The text of a regular file of at most ``limit`` bytes, else None: what the tools read of a file
    they may replace (a pipe or /dev/stdout would block the read, /dev/zero or a huge file fill memory)."""
    try:
        path = Path(path)
        if not path.is_file() or path.stat().st_size > limit:
            return None
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def json_is_ours(path: Path) -> bool:
    """A scores file evaluate wrote (segmentation or depth)."""
    try:
        spec = json.loads(small_text(path) or "")
    except ValueError:
        return False
    return isinstance(spec, dict) and "model" in spec and ("mIoU" in spec or "abs_rel" in spec)


def refuse_output(path: str, flag: str, files: list[str], args, is_ours) -> None:
    """An output file of evaluate: never among the inputs (``files``: the data; the config, label
    file and model too, see ``refuse_among_inputs``), and an existing file that evaluate did not
    write (``is_ours``) is replaced only with ``--overwrite``."""
    model = Path(args.model)
    labels = getattr(args, "labels", None)
    singles = [f for f in (labels, labels and Path(args.root or ".") / labels, args.model) if f]
    singles += config_inputs(args.config, args.root)  # the config and the files it names (its label file, ...)
    refuse_among_inputs(path, files, flag, folders=[model] if model.is_dir() else [], singles=singles)
    if not Path(path).resolve().parent.is_dir():
        raise ConfigError(f"{flag} {path}: its folder {Path(path).parent} does not exist")
    if Path(path).is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; give a file path")
    check_output_file(path, flag)
    if Path(path).exists() and not args.overwrite and not is_ours(Path(path)):
        raise ConfigError(f"{flag} {path}: already there and not written by evaluate; give another path, or "
                          "--overwrite to replace it")


def check_output_file(path: str | Path, flag: str) -> None:
    """An output file, before the work: no entry that is not a regular file (a pipe, /dev/stdout: the
    write would replace the entry, and reading it to see whose it is would block), in a folder that
    takes a new file now (an empty hidden one, made and removed), so that a folder the OS refuses
    (read-only, /proc) is said before the work, not after it. The path is given to the OS as
    written: "missing/../x.json" resolves on paper, not on the disk."""
    import secrets

    if Path(path).exists() and not Path(path).is_file():
        raise ConfigError(f"{flag} {path}: not a regular file (a pipe, device or socket); give a file path")
    probe = os.path.join(os.path.dirname(str(path)) or ".", f".dptune-probe-{secrets.token_hex(6)}")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: its folder cannot be written ({e.strerror or e})") from None


def model_task(ref: str) -> str:
    """``depth``, ``segmentation`` or ``multitask``: what a checkpoint or exported directory holds."""
    from dptune.models.source import is_joint_export

    if is_joint_export(ref):
        return "multitask"
    if Path(ref).is_dir():
        if not (Path(ref) / "config.json").is_file():
            raise ConfigError(f"--model {ref}: no config.json there: not an exported model (a folder written by "
                              "dptune export: config.json + model.safetensors, or segmentation/ + depth/)")
        try:
            cfg = json.loads((Path(ref) / "config.json").read_text())
        except (UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"--model {ref}: config.json is not readable JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"--model {ref}: config.json is not a model config (a JSON object)")
        return "depth" if any("DepthEstimation" in a for a in cfg.get("architectures") or []) else "segmentation"
    from dptune.tasks.checkpoints import load_checkpoint

    return load_checkpoint(ref).get("dptune", {}).get("task", "segmentation")
