"""The files an image glob matches: the extension in either case, and the files left out only for
another spelling of it (``.jpeg`` beside ``*.jpg``) counted in a warning, never dropped silently."""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
from collections.abc import Sequence

from dptune.errors import DataError

log = logging.getLogger(__name__)


def any_case_extension(pattern: str) -> str:
    """``pattern`` with the letters of its literal file extension matching either case: ``*.jpg``
    finds ``.JPG`` and ``.Jpg`` too (cameras and phones write upper case), ``*.jp*g`` ``.JPEG``.
    Wildcards stay wildcards; an extension holding brackets is left as it is."""
    head, tail = os.path.split(pattern)
    stem, dot, ext = tail.rpartition(".")
    if not dot or not stem or not ext or any(c in ext for c in "[]"):
        return pattern
    letters = "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() and c.lower() != c.upper() else c for c in ext)
    return os.path.join(head, f"{stem}.{letters}")


# spellings of one format's extension: a glob naming one leaves out the files named with another
SAME_FORMAT_EXTENSIONS = ({"jpg", "jpeg", "jpe", "jfif"}, {"tif", "tiff"})
_warned_spellings: set[str] = set()


def other_spellings(pattern: str, found: Sequence[str]) -> tuple[list[str], str] | None:
    """Files in the folders of ``found`` (the files ``pattern`` matched; one listing per folder;
    none matched: the pattern's own folder, when it names one) that the glob leaves out only for
    another spelling of its extension (``a.jpeg`` beside ``*.jpg``), and the extension of a glob
    that takes them (``jp*g``); None when there are none."""
    head, tail = os.path.split(pattern)
    stem, dot, ext = tail.rpartition(".")
    group = next((g for g in SAME_FORMAT_EXTENSIONS if ext.lower() in g), None)
    if not dot or group is None:
        return None
    folders = {os.path.dirname(p) for p in found}
    if not found and not glob.has_magic(head):
        folders = {head or "."}
    taken, missed = set(found), []
    for folder in sorted(folders):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            base, _, other = name.rpartition(".")
            if (base and other.lower() in group and other.lower() != ext.lower()
                    and fnmatch.fnmatchcase(f"{base}.{ext}", tail) and os.path.join(folder, name) not in taken
                    and os.path.isfile(os.path.join(folder, name))):
                missed.append(os.path.join(folder, name))
    if not missed:
        return None
    return sorted(missed), {"jpg": "jp*g", "jpeg": "jp*g", "tif": "tif*", "tiff": "tif*"}.get(ext.lower(), "*")


def spelling_note(pattern: str, found: Sequence[str], shown: str | None = None) -> str | None:
    """The words for ``other_spellings`` (``shown``: the glob as the user wrote it), or None."""
    missed = other_spellings(pattern, found)
    if missed is None:
        return None
    files, wider = missed
    shown = shown or pattern
    head, tail = os.path.split(shown)
    return (f"{len(files)} image file(s) in the folders of {shown!r} do not match it (e.g. "
            f"{os.path.basename(files[0])}): another spelling of its extension; widen the glob, e.g. "
            f"{os.path.join(head, tail.rpartition('.')[0] + '.' + wider)!r}, to take them")


def glob_files(pattern: str, shown: str | None = None, dangling: bool = False) -> list[str]:
    """The files a glob matches (``**`` recursive; the file extension in either case, see
    ``any_case_extension``), sorted, each once. Files beside them left out only for another
    spelling of the extension (``.jpeg`` beside ``*.jpg``, see ``other_spellings``) are counted in
    a warning, once per pattern (``shown``: as the user wrote it), never dropped without a word."""
    # with ``dangling`` (a split's images) a link whose target is gone stays in: read, it is a bad sample named
    # as such (left out, it was dropped from the training data without a word); folders that match are not files
    found = sorted({p for p in glob.glob(any_case_extension(pattern), recursive=True)
                    if os.path.isfile(p) or (dangling and os.path.islink(p) and not os.path.exists(p))})
    if found and pattern not in _warned_spellings:
        note = spelling_note(pattern, found, shown)
        if note:
            _warned_spellings.add(pattern)
            log.warning("%s", note)
    return found


def match_images(root: str, images: str) -> list[str]:
    """The image files a glob (relative to ``root`` unless absolute) matches, sorted, the extension
    in any case (``*.jpg`` takes ``.JPG`` too; ``.jpeg`` files beside them are counted in a
    warning); none is an error (that names such files when the folder holds them)."""
    pattern = images if os.path.isabs(images) else os.path.join(root, images)
    found = glob_files(pattern, shown=images, dangling=True)
    if not found:
        note = spelling_note(pattern, [], images)
        raise DataError(f"{pattern}: no images match" + (f"; {note}" if note else ""))
    return found
