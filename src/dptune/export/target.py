"""The directory an export occupies: checked before any work (``export_target``: a new or empty
directory, or with ``--overwrite`` an earlier export holding nothing else), built hidden beside or
inside it and moved into place only when complete (``staged``), its new files given a plain file's
mode (``plain_file_modes``)."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dptune.errors import ConfigError, disk_state
from dptune.models.folders import export_folder_around

log = logging.getLogger(__name__)

REMOTE_MODULE = "modeling_dptune"  # the module a remote-code export writes beside its weights


class OutputDirError(ConfigError):
    """An output directory the export may not occupy; the message names it."""


MODEL_FILES = ("config.json", "dptune.json", "model.safetensors")


def holds_model(path: Path) -> bool:
    """Whether ``path`` holds a model directory (an earlier export, one task's or a joint one's parts)."""
    return any((d / f).is_file() for d in (path, path / "segmentation", path / "depth") for f in MODEL_FILES)


# every name an export writes (a joint export: its parts in segmentation/ and depth/)
EXPORT_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "dptune.json",
                "model.onnx", "model.onnx.data", "model_int8.onnx", "model_fp16.onnx", f"{REMOTE_MODULE}.py"}
PART_DIRS = {"segmentation", "depth"}


def foreign_entries(path: Path) -> list[str]:
    """What in ``path`` an export does not write (a user's notes, a ``.git``, a project): ``--overwrite``
    replaces a directory as a whole only when it holds a dptune export and nothing else."""
    foreign = []
    for p in sorted(path.iterdir()):
        if p.name in PART_DIRS and p.is_dir() and not p.is_symlink():
            foreign += [f"{p.name}/{q.name}" for q in sorted(p.iterdir())
                        if q.name not in EXPORT_FILES or not q.is_file() or q.is_symlink()]
        elif p.name not in EXPORT_FILES or not p.is_file():
            foreign.append(p.name)
    return foreign


def export_target(out: Path, src: Path, overwrite: bool) -> Path:
    """The directory the export will occupy, checked before any work: ``out`` itself, or where it
    points when it is a symbolic link (said in a warning). Refused with one line: a file, a link to
    nothing, a non-empty directory without ``overwrite``; with ``overwrite``, a directory that holds
    no earlier export, the current directory (or one above it), or one the source lies in."""
    target = out.resolve()  # a new or empty directory is used as it is; the links above it lead where it is
    if out.is_symlink():
        if not target.exists():
            raise OutputDirError(f"{out}: a symbolic link to {target}, which does not exist; create it or "
                                 "choose another output directory")
        log.warning("%s is a symbolic link: the export goes to %s", out, target)
    if target.exists() and not target.is_dir():
        raise OutputDirError(f"{out}: exists and is not a directory")
    model = export_folder_around(target, itself=False)  # the target itself: an earlier export, see below
    if model is not None:
        raise OutputDirError(f"{out}: is inside {model}, an exported model's folder; an export goes into a folder "
                             "of its own (inside another it would be mixed into that model, and a later --overwrite "
                             "of that one refused)")
    entries = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    staging = [e for e in entries if _staging(e)]
    if staging:  # never deleted here: a live export's folder, or the only copy of an earlier export
        raise OutputDirError(f"{out}: holds {staging[0]}, {_staging_words(staging[0])}")
    if not entries:
        return target
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    if not overwrite:
        raise OutputDirError(f"{out}: not empty ({shown}); an export goes into a new or empty directory, "
                             "--overwrite replaces an earlier export there as a whole")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise OutputDirError(f"{out}: --overwrite would remove the current directory; choose another output directory")
    if target in src.resolve().parents:
        raise OutputDirError(f"{out}: --overwrite would remove the source {src}, which lies in it; "
                             "choose another output directory")
    if not any((d / "dptune.json").is_file() for d in (target, *(target / p for p in PART_DIRS))):
        raise OutputDirError(f"{out}: holds no earlier export (no dptune.json) but {shown}; "
                             "--overwrite replaces only an export, choose a new or empty directory")
    foreign = foreign_entries(target)
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise OutputDirError(f"{out}: holds files an export does not write ({', '.join(foreign[:5])}{more}); "
                             "--overwrite replaces an export as a whole and would delete them: move them out "
                             "or choose another output directory")
    return target


def os_refusal(e: BaseException) -> str | None:
    """Why making a folder failed, for any ``OSError`` (read-only, no permission, full), else None."""
    return (e.strerror or str(e)) if isinstance(e, OSError) else None


@contextmanager
def refusal_named(target: Path, why: Callable[[BaseException], str | None]) -> Iterator[None]:
    """An exception ``why`` reads as the file system refusing the write (``os_refusal`` while the
    export's folder is made, ``disk_state`` while it is written) is an ``OutputDirError`` naming
    ``target``, not the hidden staging folder; anything else is raised as it is."""
    try:
        yield
    except Exception as e:
        reason = why(e)
        if reason is None:
            raise
        raise OutputDirError(f"{target}: cannot be written ({reason})") from None


def _staging(name: str) -> bool:
    """Whether ``name`` is an export's hidden folder in the folder it exports into: its staging folder
    (``.partial``) or the earlier export's files it moves aside (``.replaced``)."""
    import re

    return bool(re.fullmatch(r"\.dptune-export\.[0-9a-f-]+\.(partial|replaced)", name))


def _staging_words(name: str) -> str:
    """What an export's hidden folder found in its output folder is, and what to do (nothing is deleted by
    dptune: whether another export still writes there, in this machine or another, it cannot tell)."""
    if name.endswith(".replaced"):
        return ("the earlier export's files that an export stopped midway (killed) had moved aside: move them back "
                "up into the folder (or delete that folder if the export is not wanted), then export again")
    return ("the hidden folder of an export writing there now, or of one that was stopped midway (killed): run one "
            "export at a time into a folder, and delete it once no export is running there")


@contextmanager
def staged(target: Path, replace: bool = False) -> Iterator[Path]:
    """A new hidden directory to build the export in, moved into place when the block completes and
    removed when it fails: nothing is mixed in, a failed export leaves nothing behind.

    A new ``target`` is built beside it (same filesystem) and renamed into place in one step. An
    existing one (empty, or an earlier export ``export_target`` let go) is kept as the directory it
    is (its mode, owner, mount): the export is built inside it, the earlier entries are moved aside
    only once it is complete, the new ones moved up (all renames within the directory), and then the
    earlier ones deleted; if a move fails, the earlier entries are put back. Entries that appeared
    meanwhile in a directory that was empty are left alone unless ``replace`` (the export fails)."""
    if not target.is_dir():
        with refusal_named(target, os_refusal):
            target.parent.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        try:
            with refusal_named(target, disk_state):
                yield stage
            mask = os.umask(0)
            os.umask(mask)
            stage.chmod(0o777 & ~mask)  # what a plain mkdir makes (mkdtemp's is 0700)
            try:
                stage.rename(target)
            except OSError as e:  # a folder made there meanwhile (another export, the user)
                what = ", ".join(sorted(p.name for p in target.iterdir())[:3]) if target.is_dir() else "a file"
                raise OutputDirError(f"{target}: {what} appeared there during the export ({e.strerror or e}); "
                                     "nothing written") from None
        finally:
            if stage.exists():
                shutil.rmtree(stage)
        return
    tag = secrets.token_hex(4)
    stage, aside = target / f".dptune-export.{tag}.partial", target / f".dptune-export.{tag}.replaced"
    with refusal_named(target, os_refusal):
        stage.mkdir()
    try:
        with refusal_named(target, disk_state):
            yield stage
        earlier = [p for p in target.iterdir() if p != stage]
        busy = [p.name for p in earlier if _staging(p.name)]
        if busy:  # moved aside and deleted, another export's folder would fail it halfway (a traceback)
            raise OutputDirError(f"{target}: holds {busy[0]}, {_staging_words(busy[0])}; nothing written by this one")
        if earlier and not replace:
            raise OutputDirError(f"{target}: {earlier[0].name} appeared there during the export; nothing written")
        moved: list[tuple[Path, Path]] = []
        try:
            if earlier:
                aside.mkdir()
                for p in earlier:
                    p.rename(aside / p.name)
                    moved.append((aside / p.name, p))
            for p in list(stage.iterdir()):
                p.rename(target / p.name)
                moved.append((target / p.name, stage / p.name))
        except BaseException as e:  # a move refused, or Ctrl-C / SIGTERM halfway: the earlier export put back
            for now, was in reversed(moved):
                now.rename(was)
            if not isinstance(e, OSError):
                raise
            entry = Path(e.filename).name if e.filename else "an entry"  # never the hidden folder's path
            raise OutputDirError(f"{target}: {entry} could not be moved ({e.strerror or e}); the folder is as it "
                                 "was, nothing written") from None
        if earlier:
            log.info("replaced the earlier contents of %s", target)
            try:
                shutil.rmtree(aside)
            except BaseException as e:  # a Ctrl-C / SIGTERM now: the new export is in place, whatever is said
                if hasattr(e, "after") and e.after is None:
                    e.after = f"the export into {target} was complete"
                try:
                    shutil.rmtree(aside, ignore_errors=True)
                except BaseException:  # a second Ctrl-C: the earlier files stay aside, the export stands
                    pass
                raise
    finally:
        if stage.is_dir():
            shutil.rmtree(stage)  # only what this export wrote
        if aside.is_dir() and not any(aside.iterdir()):
            aside.rmdir()  # what is left in it is the earlier export's: kept, never deleted on failure


@contextmanager
def plain_file_modes(out: Path) -> Iterator[None]:
    """Give the files this export creates under ``out`` the mode a new file gets from a plain
    ``open()``: 0666 less the umask. safetensors (0.8) writes through a temporary file, created 0600,
    that it renames into place, so ``model.safetensors`` would be readable by its owner only, unlike
    the config beside it. A file counts as created when its path or its inode is new (a rename into
    place, an older export's 0600 weights included); files rewritten in place keep their mode, and
    nothing else under ``out`` is touched."""
    def inodes() -> dict[Path, int]:
        return {p: p.stat().st_ino for p in out.rglob("*") if p.is_file() and not p.is_symlink()} if out.is_dir() else {}

    before = inodes()
    yield
    if os.name != "posix":
        return
    mask = os.umask(0)
    os.umask(mask)
    for p, inode in inodes().items():
        if before.get(p) != inode and p.stat().st_mode & 0o7777 != 0o666 & ~mask:
            p.chmod(0o666 & ~mask)
