"""Label path templates: each image's mask or depth file named from the image's own path.

A template is a path with placeholders: ``{stem}`` the image's file name without its extension,
``{name}`` with it, ``{dir}`` the image's folder relative to the data root, and ``{id}`` what the
image glob's wildcards matched in the file name (its stem less the fixed text the glob puts before
and after them: ``rgb/rgb_*.jpg`` gives ``00045`` for ``rgb_00045.jpg``, so NYU Depth v2's
``depth/sync_depth_{id}.png`` pairs with it). ``{{`` and ``}}`` write a brace.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

from dptune.data.loaders import rank
from dptune.errors import DataError

PLACEHOLDERS = ("stem", "name", "dir", "id")
_KNOWN = "{stem}, {name}, {dir} and {id}"


def check_template(template: str) -> None:
    """One line naming the template when it holds a placeholder the language does not have (a
    typo, an index or attribute, a conversion), a format spec strings do not take, or an unmatched
    brace. A string format spec is kept: ``{id:0>5}`` pads the id with zeros to 5 characters."""
    try:
        fields = [(f, conv, spec) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise DataError(f"{template}: not a path template ({e}); its placeholders are {_KNOWN}, and {{{{ or "
                        "}} writes a brace") from None
    for field, conv, spec in fields:
        shown = "{" + field + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        if field not in PLACEHOLDERS or conv or "{" in spec:
            raise DataError(f"{template}: unknown placeholder {shown}; a path template's placeholders are {_KNOWN}")
        try:
            format("0", spec)
        except ValueError as e:
            raise DataError(f"{template}: {shown}: not a format for a name ({e})") from None


def _wildcards(tail: str) -> list[tuple[int, int]]:
    """Where a glob's file-name part has wildcards: ``*``, ``?`` and ``[...]`` (a ``]`` right after
    ``[`` or ``[!`` is literal, as in ``fnmatch``; a ``[`` with no closing ``]`` is literal)."""
    spans, i = [], 0
    while i < len(tail):
        if tail[i] in "*?":
            spans.append((i, i + 1))
        elif tail[i] == "[":
            close = tail.find("]", i + (3 if tail[i + 1:i + 2] == "!" else 2))
            if close != -1:
                spans.append((i, close + 1))
                i = close
        i += 1
    return spans


def glob_id(image_path: str, pattern: str | None) -> str:
    """What ``pattern``'s wildcards matched in the stem of ``image_path`` (a file it matched): the
    glob's file-name part less its extension (``*_rgb.jp*g`` -> ``*_rgb``; wildcards in the extension
    match the extension only), and the file's stem less that part's fixed text before its first
    wildcard and after its last. No wildcard before the extension: the whole stem."""
    stem = Path(image_path).stem
    tail = os.path.basename(pattern or "")
    head, dot, _ = tail.rpartition(".")
    spans = _wildcards(head if dot else tail)
    if not spans:
        return stem
    part = head if dot else tail
    before, after = part[:spans[0][0]], part[spans[-1][1]:]
    if len(before) + len(after) > len(stem):
        return stem
    return stem[len(before):len(stem) - len(after)]


def mask_path_for(image_path: str, template: str, root: str, pattern: str | None = None) -> str:
    """Fill a label template for one image (module docstring; ``pattern``: the glob that found the
    image, for ``{id}``). Relative results are relative to ``root``."""
    check_template(template)
    return _filled(image_path, template, root, pattern)


def _filled(image_path: str, template: str, root: str, pattern: str | None) -> str:
    """``mask_path_for`` for a template already checked (``paths_for`` checks it once, not per image)."""
    p = Path(image_path)
    folder = os.path.relpath(p.parent, root) if not os.path.isabs(template) else str(p.parent.resolve())
    filled = template.format(stem=p.stem, name=p.name, dir=folder, id=glob_id(image_path, pattern))
    if not os.path.isabs(filled):
        filled = os.path.join(root, filled)
    return os.path.normpath(filled)


def paths_for(images: list[str], template: str, root: str, what: str, pattern: str | None = None) -> list[str]:
    """Each image's ``what`` file (mask, depth map) by ``template`` (``mask_path_for``; ``pattern``:
    the images' glob); one line when two images get the same file (a template without a placeholder
    pairs every image with one label: every sample would train and score against it) or an image is its
    own (the images' glob matched the labels)."""
    check_template(template)
    paths = [_filled(p, template, root, pattern) for p in images]
    first: dict[str, str] = {}
    for image, path in zip(images, paths, strict=True):
        if os.path.normpath(os.path.abspath(image)) == os.path.abspath(path):
            raise DataError(f"{template}: gives {what} file {path} for itself: the images' glob matches the "
                            f"{what} files; point it at the images")
        if path in first:
            raise DataError(f"{template}: gives the same {what} file {path} for {first[path]} and {image}; name each "
                            f"image's own file with {_KNOWN.replace(' and ', ' or ')} in the template")
        first[path] = image
    if pattern and rank() == 0:  # said once per run
        _say_labelled_left_out(images, paths, template, root, what, pattern)
    return paths


# the extensions of image files a split's folder may hold beside its images
IMAGE_EXTENSIONS = {"jpg", "jpeg", "jpe", "jfif", "png", "bmp", "tif", "tiff", "webp"}


def _say_labelled_left_out(images: list[str], labels: list[str], template: str, root: str, what: str,
                           pattern: str) -> None:
    """A warning counting the files beside ``images`` that the glob ``pattern`` leaves out only for their
    image extension (``a.png`` beside ``*.jpg``) and that have a ``what`` file by ``template``: samples the
    user labelled, dropped without a word otherwise. Another spelling of the glob's own format (``.jpeg``
    beside ``*.jpg``) is said by ``dptune.data.globs``."""
    import fnmatch
    import logging

    from dptune.data.globs import SAME_FORMAT_EXTENSIONS

    tail = os.path.basename(pattern)
    ext = tail.rpartition(".")[2].lower()
    same = next((g for g in SAME_FORMAT_EXTENSIONS if ext in g), {ext})
    taken = set(images) | set(labels)
    missed = []
    for folder in sorted({os.path.dirname(p) for p in images}):
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            base, dot, other = name.rpartition(".")
            path = os.path.join(folder, name)
            if (not dot or other.lower() not in IMAGE_EXTENSIONS - same or path in taken
                    or not fnmatch.fnmatchcase(f"{base}.{tail.rpartition('.')[2]}", tail)):
                continue
            try:
                label = _filled(path, template, root, pattern)
            except (DataError, ValueError, KeyError, IndexError):  # an {id} the glob does not give for it
                continue
            # (a label of a matched image: a copy of that image in another format, not a sample left out)
            if label != os.path.normpath(path) and label not in taken and os.path.isfile(label):
                missed.append(path)
    if missed:
        logging.getLogger(__name__).warning(
            "%d image file(s) beside the images of %r have a %s but do not match it (e.g. %s): another image "
            "format; widen the glob to take them", len(missed), pattern, what, os.path.basename(missed[0]))
