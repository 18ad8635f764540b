"""What the tools write, safely: the output names of the inputs and writes that replace a directory
entry (a link is never written through). What they read, and the refusal to write among it:
``dptune.tools.inputs``; predict's run over its inputs and its list of the files it wrote:
``dptune.tools.predict_run``."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from dptune.errors import DataError

# every file name predict may derive from a stem: two inputs never share one (see ``output_stems``)
OUTPUT_SUFFIXES = (".png", "_overlay.png", "_confidence.png", "_depth.png", "_depth.tiff", "_depth_color.png", ".ply")


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
    except OSError as e:  # named after the output, not the hidden file
        raise OutputRefused(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    """A text file written by ``write_replacing``."""
    write_replacing(path, lambda tmp: Path(tmp).write_text(text))


def imwrite(path: Path, array: np.ndarray) -> None:
    """The image file at ``path`` (its format by the extension), through ``write_replacing``: OpenCV
    encodes it and Python writes it, so that a disk that refuses the write says why (``cv2.imwrite``
    returns False, and libpng prints an unnamed "Write Error")."""
    ok, encoded = cv2.imencode(Path(path).suffix, array)
    if not ok:
        raise DataError(f"{path}: could not be encoded as {Path(path).suffix}")
    write_replacing(path, lambda tmp: Path(tmp).write_bytes(encoded.tobytes()))


class OutputRefused(OSError):
    """The file system refused to write an output: ``filename`` is the output (never the hidden
    file it is written as first), ``strerror`` why."""

    def __str__(self) -> str:
        return f"{self.filename}: cannot be written ({self.strerror})"
