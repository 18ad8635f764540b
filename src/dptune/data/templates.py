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

from dptune.errors import DataError

PLACEHOLDERS = ("stem", "name", "dir", "id")
_KNOWN = "{stem}, {name}, {dir} and {id}"


def check_template(template: str) -> None:
    """One line naming the template when it holds a placeholder the language does not have (a
    typo, an index or attribute, a format spec) or an unmatched brace."""
    try:
        fields = [(f, conv, spec) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise DataError(f"{template}: not a path template ({e}); its placeholders are {_KNOWN}, and {{{{ or "
                        "}} writes a brace") from None
    for field, conv, spec in fields:
        if field not in PLACEHOLDERS or conv or spec:
            shown = "{" + field + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            raise DataError(f"{template}: unknown placeholder {shown}; a path template's placeholders are {_KNOWN}")


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
    """What ``pattern``'s wildcards matched in the file name of ``image_path`` (which it matched),
    less the extension: the stem without the glob's fixed text before the first wildcard and after
    the last (up to the extension). A glob without wildcards in the file name: the whole stem."""
    stem = Path(image_path).stem
    tail = os.path.basename(pattern or "")
    spans = _wildcards(tail)
    if not spans:
        return stem
    before, after = tail[:spans[0][0]], tail[spans[-1][1]:]
    after = after.rpartition(".")[0]  # the fixed text after the last wildcard, without the extension
    if len(before) + len(after) > len(stem):
        return stem
    return stem[len(before):len(stem) - len(after)]


def mask_path_for(image_path: str, template: str, root: str, pattern: str | None = None) -> str:
    """Fill a label template for one image (module docstring; ``pattern``: the glob that found the
    image, for ``{id}``). Relative results are relative to ``root``."""
    check_template(template)
    p = Path(image_path)
    folder = os.path.relpath(p.parent, root) if not os.path.isabs(template) else str(p.parent.resolve())
    filled = template.format(stem=p.stem, name=p.name, dir=folder, id=glob_id(image_path, pattern))
    if not os.path.isabs(filled):
        filled = os.path.join(root, filled)
    return os.path.normpath(filled)


def paths_for(images: list[str], template: str, root: str, what: str, pattern: str | None = None) -> list[str]:
    """Each image's ``what`` file (mask, depth map) by ``template`` (``mask_path_for``; ``pattern``:
    the images' glob); one line when two images get the same file (a template without a placeholder
    pairs every image with one label: every sample would train and score against it)."""
    check_template(template)
    paths = [mask_path_for(p, template, root, pattern) for p in images]
    first: dict[str, str] = {}
    for image, path in zip(images, paths, strict=True):
        if path in first:
            raise DataError(f"{template}: gives the same {what} file {path} for {first[path]} and {image}; name each "
                            f"image's own file with {_KNOWN.replace(' and ', ' or ')} in the template")
        first[path] = image
    return paths
