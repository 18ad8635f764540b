"""predict's run over its inputs: the list of the files it wrote in ``--out`` (``MANIFEST``: what a
later run may replace, and nothing else), one input at a time with a progress bar, each failure named
in one line, and the exit status that counts them. The writes themselves: ``dptune.tools.outputs``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from dptune.data.images import read_image
from dptune.errors import ConfigError, disk_state, sigterm_interrupts
from dptune.tools.inputs import shown, small_text
from dptune.tools.outputs import OUTPUT_SUFFIXES, OutputRefused, write_text

MANIFEST = "dptune-predict.json"  # in --out: the files predict wrote there (what a later run may replace)


def _manifest(out: Path) -> dict[str, list | None]:
    """The files a previous run listed in ``OUT/dptune-predict.json``, each with its stamp as written
    (``_stamp``; None in a list written before stamps were kept); a file of that
    name that is not such a list stops the run (it is the user's)."""
    path = out / MANIFEST
    if not path.exists():
        return {}
    try:
        spec = json.loads(small_text(path) or "")
        files = spec["files"] if spec.get("written_by") == "dptune predict" else None
        stamps = spec.get("stamps") or {}
    except (ValueError, AttributeError, KeyError, TypeError):
        files = None
    if not isinstance(files, list) or not isinstance(stamps, dict):
        raise ConfigError(f"{path}: already there and not dptune's list of its predictions; predict into another "
                          "folder")
    return {str(f): stamps.get(str(f)) for f in files}


def _stamp(path: Path) -> list | None:
    """Size, modification time and content hash of the file at ``path``, as predict wrote it: what
    tells its file from one changed since (a mask corrected by hand is the user's). None for an
    entry that is no regular file."""
    import hashlib

    try:
        st = path.lstat()
        if not path.is_file() or path.is_symlink():
            return None
        return [st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()[:32]]
    except OSError:
        return None


def _unchanged(path: Path, stamp: list | None, listed_at: int) -> bool:
    """The file at ``path`` is as predict wrote it: the same size and time, or (a copy: ``cp -r``,
    tar) the same size and content; a list written before stamps were kept (``stamp`` None): not
    modified after the list was (``listed_at``, its time)."""
    try:
        st = path.lstat()
    except OSError:
        return False
    if stamp is None:
        return st.st_mtime_ns <= listed_at
    if len(stamp) < 3 or st.st_size != stamp[0]:
        return False
    if st.st_mtime_ns == stamp[1]:
        return True
    now = _stamp(path)
    return now is not None and now[2] == stamp[2]


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What tells a file predict has just written (a new directory entry: ``write_replacing``) from
    the one that was there: inode, device, modification time; None when there is none."""
    try:
        st = path.lstat()
    except OSError:
        return None
    return st.st_ino, st.st_dev, st.st_mtime_ns


class _Listing:
    """``OUT/dptune-predict.json`` of the run under way: the files a previous run wrote (and that are
    still there) and the files this run has written so far, nothing planned. ``written(stem)`` adds
    the outputs of one input that are now a new file; the list is saved now and then and at the end,
    so an interrupted run lists what it wrote up to then (at worst a file it wrote is left out, and a
    later run then asks for ``--overwrite`` before replacing it: never the other way)."""

    SAVE_EVERY_S = 2.0

    def __init__(self, out: Path, ours: dict[str, list | None], planned: list[str]) -> None:
        import time

        self.out, self.files, self.stamps = out, set(ours), {f: s for f, s in ours.items() if s is not None}
        self.before = {f: _identity(out / f) for f in planned}
        self.by_stem: dict[str, list[str]] = {}
        for f in planned:  # each planned name is one stem's + one of OUTPUT_SUFFIXES (see output_stems)
            for suffix in OUTPUT_SUFFIXES:
                if f.endswith(suffix):
                    self.by_stem.setdefault(f[: -len(suffix)], []).append(f)
        self.saved_at, self.clock = time.monotonic(), time.monotonic
        self.inputs: int | None = None  # the run's inputs and how many were done (each save says so)
        self.done = 0
        self.unsaved = ""  # why the last save failed, if it did

    def written(self, stem: str, force: bool = False) -> None:
        for f in self.by_stem.get(stem, []):
            now = _identity(self.out / f)
            if now is not None and now != self.before[f]:
                self.files.add(f)
                self.stamps[f] = _stamp(self.out / f)
        if force or self.clock() - self.saved_at >= self.SAVE_EVERY_S:
            self.save()

    def save(self) -> None:
        """The list written now. Once the run is under way, a refusal to write it is kept in
        ``unsaved`` (said at the end) and the predictions go on."""
        spec: dict = {"written_by": "dptune predict", "files": sorted(self.files),
                      "stamps": {f: self.stamps[f] for f in sorted(self.files) if self.stamps.get(f)}}
        if self.inputs is not None:  # a run stopped part way (Ctrl-C, a crash) says so: complete false
            spec.update(inputs=self.inputs, inputs_done=self.done, complete=self.done == self.inputs)
        try:
            write_text(self.out / MANIFEST, json.dumps(spec, indent=1) + "\n")
            self.unsaved = ""
        except OutputRefused as e:
            if self.inputs is None:
                raise
            self.unsaved = str(e)
        self.saved_at = self.clock()


_listing: _Listing | None = None  # set by prepare_out, kept up to date by predict_each


def prepare_out(out: str | Path, planned: list[str], overwrite: bool = False) -> Path:
    """The output folder, made, with its list of predict's files (``MANIFEST``): a previous run's
    files that are still there; ``predict_each`` adds each file as it is written (only those: a name
    planned for an input that failed is never listed). A planned file already there that predict
    did not write (not in the list) stops the run in one line unless ``overwrite``."""
    global _listing

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder")
    # a name listed but gone is no longer ours, nor one changed since it was written (a mask corrected by hand)
    listed_at = (out / MANIFEST).stat().st_mtime_ns if (out / MANIFEST).is_file() else 0
    ours = {f: stamp for f, stamp in _manifest(out).items()
            if os.path.lexists(out / f) and _unchanged(out / f, stamp, listed_at)}
    foreign = [f for f in planned if f not in ours and os.path.lexists(out / f)]  # a link to nowhere is one too
    if foreign and not overwrite:
        raise ConfigError(f"--out {out}: {len(foreign)} file(s) there that predict did not write, or that changed "
                          f"since, would be overwritten (first: {out / foreign[0]}); predict into another folder, "
                          "or give --overwrite")
    stale = stale_outputs(ours, planned)
    if stale:  # e.g. a cloud of an earlier run with --intrinsics, beside this run's new map without one
        print(f"note: {len(stale)} file(s) an earlier predict wrote for these images stay as they were, as this run "
              f"writes no such file (first: {out / stale[0]})", file=sys.stderr)
    made: list[Path] = []  # the folders this call made: removed again if the output cannot be prepared
    try:  # the folders and the list first: a folder the file system refuses is named before any prediction
        for folder in sorted({(out / f).parent for f in planned} | {out}):
            blocker = next((p for p in (folder, *folder.parents) if os.path.lexists(p) and not p.is_dir()), None)
            if blocker is not None:  # a file (or a link to nowhere) where one of the output's folders must go
                what = "a link to nothing" if blocker.is_symlink() and not blocker.exists() else "a file"
                raise ConfigError(f"--out {out}: {blocker} is {what} where predict needs a folder; move it, or "
                                  "predict into another folder")
            made += [p for p in (*reversed(folder.parents), folder) if not os.path.lexists(p)]
            folder.mkdir(parents=True, exist_ok=True)
        _listing = _Listing(out, ours, planned)
        _listing.save()
    except (OSError, ConfigError) as e:
        for folder in reversed(made):
            try:
                folder.rmdir()  # only if still empty
            except OSError:
                pass
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"--out {out}: cannot be written ({e.strerror or e})") from None
    return out


def stale_outputs(ours: dict[str, list | None], planned: list[str]) -> list[str]:
    """Files an earlier run wrote (``ours``) for the stems this run predicts, that this run does not
    write (``planned``): left as they were, so they may no longer match this run's outputs."""
    def stem(name: str) -> str | None:
        return next((name[: -len(s)] for s in sorted(OUTPUT_SUFFIXES, key=len, reverse=True) if name.endswith(s)),
                    None)

    stems = {stem(f) for f in planned}
    return sorted(f for f in ours if f not in set(planned) and stem(f) in stems)


class Failed(list):
    """The inputs ``predict_each`` did not predict, in order. ``stopped``: where and why it stopped
    before the end (the disk refused a write, as it would every later one), else empty; ``unlisted``:
    why the list of the files it wrote could not be saved, else empty."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped = self.unlisted = ""


def predict_each(paths: list[str], stems: list[str], desc: str,
                 one: Callable[[str, str, np.ndarray], None]) -> list[str]:
    """``one(path, stem, image)`` for each input, with a progress bar; an image that cannot be read
    (empty, damaged, not an image) or predicted is named in one line and the others go on. Returns
    the inputs that failed."""
    global _listing

    failed = Failed()
    listing, _listing = _listing, None
    if listing is not None:
        listing.inputs = len(paths)
        listing.save()  # from the start, the list says the run is under way (complete: false)
    try:
        with sigterm_interrupts():  # a SIGTERM ends the run as a Ctrl-C does: what it wrote is listed
            for i, (path, stem) in enumerate(tqdm(list(zip(paths, stems, strict=True)), desc=desc)):
                try:
                    one(path, stem, read_image(path))
                except (ValueError, RuntimeError, OSError, cv2.error, MemoryError) as e:  # DataError is a ValueError
                    tqdm.write(f"error: {shown(path)}: {failure_reason(e, path)}", file=sys.stderr)  # on its own line
                    failed.append(path)
                    if isinstance(e, OutputRefused) and disk_state(e):
                        where = listing.out if listing is not None else Path(e.filename).parent
                        failed.stopped = f"{path}: {where} cannot be written ({disk_state(e)})"
                        failed.extend(paths[i + 1:])
                finally:
                    if listing is not None:  # what this input wrote, even in part, is listed; nothing else
                        listing.written(stem)
                if listing is not None:  # predicted or named as failed: done (a Ctrl-C in it never gets here)
                    listing.done += 1
                if failed.stopped:
                    break
    finally:
        if listing is not None:
            listing.save()
            failed.unlisted = listing.unsaved
    return failed


def failure_reason(e: BaseException, path: str) -> str:
    """Why one input failed, in one line, without the input's path (it is said before it)."""
    if isinstance(e, MemoryError):  # a huge image, or --scales that make it one
        return "out of memory predicting it (the image, at the sizes predicted, is too large for this machine)"
    text = str(e).strip()
    if text.startswith(path):
        text = text[len(path):].lstrip(": ")
    if isinstance(e, OSError):  # one sentence, which may name an output whose name holds a newline
        return shown(text) or type(e).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]  # OpenCV's reason is its last line
    return (lines[-1] if isinstance(e, cv2.error) else lines[0]) if lines else type(e).__name__


def failures(failed: Failed, total: int) -> int:
    """The exit status, with one line that counts the failures (each was named as it happened) or
    says where the run stopped, and one naming the list of written files if it could not be saved."""
    if failed.unlisted:
        print(f"error: {failed.unlisted}: it does not list all this run wrote, so a later predict into that folder "
              "asks for --overwrite before replacing those files", file=sys.stderr)
    if failed.stopped:
        print(f"error: stopped at {shown(failed.stopped)}; {total - len(failed)} of {total} images predicted",
              file=sys.stderr)
    elif failed:
        print(f"error: {len(failed)} of {total} images could not be predicted (each named above, first "
              f"{shown(failed[0])}); "
              f"the other {total - len(failed)} were predicted", file=sys.stderr)
    return 2 if failed or failed.unlisted else 0
