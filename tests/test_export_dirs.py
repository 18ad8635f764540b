"""Where an export goes: never mixed with what a directory already holds, never through a link
without saying so, never half-written; and the plain scorers run a model's shipped code only when told."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY
from PIL import Image

from dptune.labels import LabelSet

MODELS = REPO / "configs" / "models"
NAMES = ["a", "b", "c"]
DEPTH_TINY = {k: v for k, v in TINY.items() if k not in ("use_auxiliary_head", "semantic_loss_ignore_index")}


def save_dir(module, out: Path) -> Path:
    """An exported-directory source (what export.py re-exports), without going through export."""
    module.model.save_pretrained(out)
    module.image_processor().save_pretrained(out)
    (out / "dptune.json").write_text(json.dumps({"labels": LabelSet(names=NAMES).to_dict()}))
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny random sources: a ViT DPT directory, a DINOv2 DPT directory (its export ships
    modeling_dptune.py) and a segmentation + depth checkpoint (exported as two subfolders)."""
    from dptune.tasks.multitask import MultiTaskModule
    from dptune.tasks.segmentation import SegmentationModule

    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    vit = save_dir(SegmentationModule(config=dict(TINY), label_spec={"names": NAMES}, image_size=64).eval(),
                   root / "vit")
    dino = save_dir(SegmentationModule(config=str(MODELS / "dpt-dinov2-tiny.json"), label_spec={"names": NAMES},
                                       image_size=56).eval(), root / "dino")
    joint = MultiTaskModule(config=dict(TINY), label_spec={"names": NAMES}, image_size=64, max_depth=10.0).eval()
    ckpt = {"state_dict": joint.state_dict(), "hyper_parameters": dict(joint.hparams)}
    joint.on_save_checkpoint(ckpt)
    torch.save(ckpt, root / "joint.ckpt")
    return {"vit": vit, "dino": dino, "joint": root / "joint.ckpt"}


def export_cli(capsys, *argv) -> tuple[int, list[str]]:
    from dptune.export.cli import main

    rc = main([str(a) for a in argv])
    return rc, error_lines(capsys.readouterr().err)


def error_lines(stderr: str) -> list[str]:
    """The lines that say what went wrong (progress bars aside: they end in carriage returns)."""
    return [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.startswith("error")]


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: a file's bytes, a link's target (links not followed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        out[key] = f"-> {os.readlink(p)}" if p.is_symlink() else (p.read_bytes() if p.is_file() else "dir")
    return out


def no_leftovers(*dirs: Path) -> None:
    """No hidden staging directory (``.*partial`` / ``.*replaced``) left beside or inside."""
    for d in dirs:
        left = [p.name for p in d.iterdir() if p.name.startswith(".")] if d.is_dir() else []
        assert not left, left


# ---------------------------------------------------------------------------- a directory that holds something
def test_export_into_a_non_empty_directory_is_refused_and_touches_nothing(sources, tmp_path, capsys):
    """The issue's case: a user's README.md overwritten, another model's model.onnx and
    modeling_dptune.py left beside the new weights. Now: one line, nothing changed."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    (out / "model.onnx").write_bytes(b"another model's graph")
    (out / "modeling_dptune.py").write_text("# another model's class\n")
    before = tree(out)
    rc, err = export_cli(capsys, sources["vit"], out)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith(f"error: {out}: not empty") and "--overwrite" in err[0], err
    assert tree(out) == before
    no_leftovers(out, tmp_path)


def test_a_symlinked_file_in_the_directory_is_not_written_through(sources, tmp_path, capsys):
    """README.md a link to the user's notes elsewhere: the card must not land in the notes."""
    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").symlink_to(notes)
    rc, err = export_cli(capsys, sources["vit"], out)
    assert rc == 2 and len(err) == 1 and "not empty" in err[0], err
    assert notes.read_text() == "my notes\n" and (out / "README.md").is_symlink()
    # replacing it removes the link, never the file it points to
    (out / "dptune.json").write_text("{}")  # as an earlier export's
    rc, err = export_cli(capsys, sources["vit"], out, "--overwrite")
    assert rc == 0, err
    assert notes.read_text() == "my notes\n"
    assert not (out / "README.md").is_symlink() and "DPT semantic segmentation" in (out / "README.md").read_text()


def test_overwrite_replaces_an_earlier_export_as_a_whole(sources, tmp_path, capsys):
    """A DINOv2 export (with modeling_dptune.py) plus a graph, replaced by a ViT export: exactly the
    files a fresh export writes, none of the earlier ones; the directory itself keeps its mode."""
    fresh = tmp_path / "fresh"
    assert export_cli(capsys, sources["vit"], fresh)[0] == 0
    out = tmp_path / "out"
    assert export_cli(capsys, sources["dino"], out)[0] == 0
    assert (out / "modeling_dptune.py").exists()
    (out / "model.onnx").write_bytes(b"the DINOv2 graph")
    out.chmod(0o750)
    rc, err = export_cli(capsys, sources["vit"], out, "--overwrite")
    assert rc == 0, err
    assert sorted(tree(out)) == sorted(tree(fresh))
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    no_leftovers(out, tmp_path)


def test_joint_parts_and_single_task_files_do_not_outlive_an_overwrite(sources, tmp_path, capsys):
    """A joint export writes segmentation/ and depth/ subfolders; a single-task one writes at the top.
    Either over the other with --overwrite leaves nothing of the earlier one."""
    out = tmp_path / "out"
    assert export_cli(capsys, sources["joint"], out)[0] == 0
    assert (out / "segmentation" / "model.safetensors").exists() and (out / "depth" / "model.safetensors").exists()
    assert export_cli(capsys, sources["vit"], out, "--overwrite")[0] == 0
    assert not (out / "segmentation").exists() and not (out / "depth").exists()
    assert export_cli(capsys, sources["joint"], out, "--overwrite")[0] == 0
    assert {p.name for p in out.iterdir()} == {"README.md", "segmentation", "depth"}
    no_leftovers(out, tmp_path)


def test_overwrite_never_removes_a_directory_that_holds_no_export_the_source_or_the_cwd(
        sources, tmp_path, capsys, monkeypatch):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "README.md").write_text("my project\n")
    (mine / "data.csv").write_text("1,2\n")
    before = tree(mine)
    rc, err = export_cli(capsys, sources["vit"], mine, "--overwrite")
    assert rc == 2 and len(err) == 1 and "holds no earlier export" in err[0], err
    assert tree(mine) == before

    earlier = tmp_path / "earlier"
    assert export_cli(capsys, sources["joint"], earlier)[0] == 0
    (earlier / "checkpoints").mkdir()
    ckpt = earlier / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(sources["joint"].read_bytes())
    rc, err = export_cli(capsys, ckpt, earlier, "--overwrite")
    assert rc == 2 and len(err) == 1 and "would remove the source" in err[0], err
    assert ckpt.exists()

    for cwd, out in ((earlier / "depth", earlier), (earlier, Path("."))):
        monkeypatch.chdir(cwd)
        rc, err = export_cli(capsys, sources["vit"], out, "--overwrite")
        assert rc == 2 and len(err) == 1 and "current directory" in err[0], err
        assert (earlier / "depth" / "model.safetensors").exists()


def test_overwrite_never_deletes_what_an_export_does_not_write(sources, tmp_path, capsys):
    """A project that happens to hold a config.json, and an earlier export a user has added notes and
    a .git to: --overwrite refuses both, naming what it would have deleted, and touches nothing."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "config.json").write_text('{"name": "my app"}')
    (project / "src" / "app.py").write_text("print(1)\n")
    before = tree(project)
    rc, err = export_cli(capsys, sources["vit"], project, "--overwrite")
    assert rc == 2 and len(err) == 1 and "holds no earlier export" in err[0], err
    assert tree(project) == before

    out = tmp_path / "out"
    assert export_cli(capsys, sources["joint"], out)[0] == 0
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / "segmentation" / "NOTES.md").write_text("my notes\n")
    before = tree(out)
    rc, err = export_cli(capsys, sources["vit"], out, "--overwrite")
    assert rc == 2 and len(err) == 1 and ".git" in err[0] and "segmentation/NOTES.md" in err[0], err
    assert tree(out) == before


def test_re_exporting_a_directory_into_itself_takes_overwrite(sources, tmp_path, capsys):
    """README: "the source may also be an exported directory" (e.g. to add ONNX): in place only
    with --overwrite, and then the directory holds the new export alone."""
    out = tmp_path / "out"
    assert export_cli(capsys, sources["vit"], out)[0] == 0
    (out / "model.onnx").write_bytes(b"an earlier graph")
    assert export_cli(capsys, out, out)[0] == 2
    rc, err = export_cli(capsys, out, out, "--overwrite")
    assert rc == 0, err
    assert not (out / "model.onnx").exists() and (out / "model.safetensors").exists()


# ---------------------------------------------------------------------------- links and failures
def test_a_symlinked_output_directory_is_followed_and_said(sources, tmp_path, capsys, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="dptune")
    real = tmp_path / "storage" / "model"
    real.mkdir(parents=True)
    link = tmp_path / "out"
    link.symlink_to(real)
    rc, err = export_cli(capsys, sources["vit"], link)
    assert rc == 0, err
    assert f"{link} is a symbolic link: the export goes to {real}" in caplog.text
    assert link.is_symlink() and (real / "model.safetensors").exists()
    no_leftovers(real, tmp_path)

    # a non-empty target behind the link is refused like any other; a link to nothing is too
    rc, err = export_cli(capsys, sources["vit"], link)
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {link}: not empty"), err
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    rc, err = export_cli(capsys, sources["vit"], dangling)
    assert rc == 2 and len(err) == 1 and "does not exist" in err[0], err
    assert not (tmp_path / "nowhere").exists()


def test_a_failed_export_leaves_nothing_and_keeps_the_earlier_one(sources, tmp_path, capsys, monkeypatch):
    import dptune.export as export

    def fails(model, path, size, tolerance, check=None, prep=None):
        path.write_bytes(b"half a graph")
        raise ValueError("ONNX export differs from torch by 1.00e+00 (> 1e-04); not written")

    monkeypatch.setattr(export, "write_onnx", fails)
    out = tmp_path / "new"
    rc, err = export_cli(capsys, sources["vit"], out, "--onnx")
    assert rc == 2 and len(err) == 1 and "ONNX export differs" in err[0], err
    assert not out.exists()
    no_leftovers(tmp_path)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_cli(capsys, sources["vit"], empty, "--onnx")[0] == 2
    assert list(empty.iterdir()) == []

    earlier = tmp_path / "earlier"
    monkeypatch.undo()
    assert export_cli(capsys, sources["dino"], earlier)[0] == 0
    before = tree(earlier)
    monkeypatch.setattr(export, "write_onnx", fails)
    assert export_cli(capsys, sources["vit"], earlier, "--onnx", "--overwrite")[0] == 2
    assert tree(earlier) == before
    no_leftovers(earlier, tmp_path)


def test_an_earlier_export_entry_that_cannot_be_moved_is_named_and_the_export_kept(sources, tmp_path, capsys,
                                                                                   monkeypatch):
    """--overwrite over an export with an immutable file (chattr +i) said "CKPT: [Errno 1] Operation not
    permitted: 'OUT/model.safetensors' -> 'OUT/.dptune-export.x.replaced/model.safetensors'": the source
    named as at fault, and a hidden path. The entry and the reason are named; the earlier export stays."""
    import errno

    earlier = tmp_path / "earlier"
    assert export_cli(capsys, sources["dino"], earlier)[0] == 0
    before = tree(earlier)
    real_rename = Path.rename

    def rename(self, target):
        if self.name == "model.safetensors" and self.parent == earlier:
            raise OSError(errno.EPERM, "Operation not permitted", str(self), str(target))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    rc, err = export_cli(capsys, sources["vit"], earlier, "--overwrite")
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"error: {earlier}: model.safetensors could not be moved (Operation not permitted); the "
                      "folder is as it was, nothing written"), err
    assert tree(earlier) == before
    no_leftovers(earlier, tmp_path)


def test_an_output_folder_that_cannot_be_written_is_named_not_the_source(sources, tmp_path, capsys, monkeypatch):
    """On a read-only file system export said "CKPT: [Errno 30] Read-only file system: '.../.out.x.partial'":
    the source named as if it were at fault, and a hidden folder. The output directory is named, for
    a new directory and for an existing empty one."""
    import errno

    from dptune.export import target as target_module

    def read_only(*a, dir=None, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(Path(dir) / ".out.x.partial"))

    with monkeypatch.context() as m:
        m.setattr(target_module.tempfile, "mkdtemp", read_only)
        rc, err = export_cli(capsys, sources["vit"], tmp_path / "out")
    assert rc == 2 and len(err) == 1, err
    assert err[0] == f"error: {tmp_path / 'out'}: cannot be written (Read-only file system)", err
    made = tmp_path / "made"
    made.mkdir()
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if self.parent == made:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(Path, "mkdir", mkdir)
        rc, err = export_cli(capsys, sources["vit"], made)
    assert rc == 2 and err == [f"error: {made}: cannot be written (Read-only file system)"], err
    no_leftovers(made, tmp_path)


@pytest.mark.parametrize("how", ["safetensors", "oserror"])
def test_an_export_that_fills_the_disk_is_one_line_naming_the_output(sources, tmp_path, capsys, monkeypatch, how):
    """Exporting onto a full disk was a 25-line traceback ending in safetensors' "SafetensorError: Error
    while serializing: I/O error: No space left on device (os error 28)" (not an OSError); a full disk
    met by a plain write said the hidden staging file. One line naming the output, nothing left behind."""
    import errno

    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    def full(self, *a, **k):
        if how == "safetensors":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".out.x.partial" / "config.json"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    rc, err = export_cli(capsys, sources["vit"], tmp_path / "out")
    assert rc == 2 and err == [f"error: {tmp_path / 'out'}: cannot be written (No space left on device)"], err
    no_leftovers(tmp_path)

@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_a_new_export_directory_gets_the_mode_of_a_plain_mkdir(sources, tmp_path, capsys):
    """Built in a temporary directory (created 0700) and renamed into place: it must not stay private.
    An existing empty directory is filled, not replaced."""
    old = os.umask(0o027)
    try:
        assert export_cli(capsys, sources["vit"], tmp_path / "a" / "out")[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "out").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "a" / "out" / "model.safetensors").stat().st_mode) == 0o640
    # an empty directory the user made (a mount point, a shared group folder) stays that directory
    made = tmp_path / "made"
    made.mkdir()
    made.chmod(0o2770)
    before = made.stat()
    assert export_cli(capsys, sources["vit"], made)[0] == 0
    after = made.stat()
    assert (after.st_ino, stat.S_IMODE(after.st_mode)) == (before.st_ino, 0o2770)
    assert (made / "model.safetensors").exists()
    no_leftovers(made, tmp_path)
    # a file is not a directory, --overwrite or not
    (tmp_path / "file").write_text("x")
    rc, err = export_cli(capsys, sources["vit"], tmp_path / "file", "--overwrite")
    assert rc == 2 and len(err) == 1 and "not a directory" in err[0] and (tmp_path / "file").read_text() == "x"


# ---------------------------------------------------------------------------- the plain scorers and remote code
def run_script(name: str, *argv, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, argv)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)


@pytest.fixture(scope="module")
def dino_export(sources, tmp_path_factory):
    from dptune.export import export

    return export(str(sources["dino"]), tmp_path_factory.mktemp("dino") / "out")


def test_score_plain_runs_shipped_code_only_with_trust_remote_code(dino_export, tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (56, 70, 3), dtype=np.uint8)).save(tmp_path / f"f{i}.png")
        Image.fromarray(rng.integers(0, 3, (56, 70), dtype=np.uint8)).save(tmp_path / f"f{i}_mask.png")
    args = ("--images", tmp_path / "f?.png", "--masks", tmp_path / "{stem}_mask.png", "--num-classes", 3)
    res = run_script("score_plain.py", dino_export, *args, tmp_path=tmp_path)
    assert res.returncode == 2 and res.stdout == "", res.stderr[-2000:]
    err = error_lines(res.stderr)
    assert len(err) == 1 and err[0].startswith(f"error: {dino_export}:"), err
    assert "modeling_dptune.py" in err[0] and "--trust-remote-code" in err[0]
    assert not (tmp_path / "modules").exists()  # nothing of the shipped code was copied or imported

    res = run_script("score_plain.py", dino_export, *args, "--trust-remote-code", tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["images"] == 2


def test_compare_backends_refuses_shipped_code_without_trust_remote_code(dino_export, tmp_path):
    """Without the flag transformers loads its own DPT class for a DINOv2 export: a random ViT."""
    Image.fromarray(np.zeros((56, 70, 3), np.uint8)).save(tmp_path / "f.png")
    res = run_script("compare_backends.py", dino_export, "--images", tmp_path / "*.png", tmp_path=tmp_path)
    err = error_lines(res.stderr)
    assert res.returncode == 2 and len(err) == 1 and "--trust-remote-code" in err[0], res.stderr[-2000:]


def test_score_depth_plain_runs_shipped_code_only_with_trust_remote_code(tmp_path):
    """A depth directory whose config.json maps AutoModelForDepthEstimation to a class shipped beside it."""
    from dptune.tasks.depth import DepthModule

    torch.manual_seed(0)
    module = DepthModule(config=dict(DEPTH_TINY), image_size=64, max_depth=10.0).eval()
    out = tmp_path / "depth"
    module.model.save_pretrained(out)
    module.image_processor().save_pretrained(out)
    (out / "custom_depth.py").write_text(
        "import sys\nfrom transformers import DPTForDepthEstimation\n\n\n"
        "class MarkedDepth(DPTForDepthEstimation):\n"
        "    def __init__(self, config):\n"
        "        super().__init__(config)\n"
        "        print('shipped code ran', file=sys.stderr)\n")
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {"AutoModelForDepthEstimation": "custom_depth.MarkedDepth"}
    (out / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "f.png")
    Image.fromarray(rng.integers(500, 5000, (48, 64)).astype(np.uint16)).save(tmp_path / "f_depth.png")
    args = ("--images", tmp_path / "f.png", "--depth", tmp_path / "{stem}_depth.png")
    res = run_script("score_depth_plain.py", out, *args, tmp_path=tmp_path)
    err = error_lines(res.stderr)
    assert res.returncode == 2 and len(err) == 1 and "custom_depth.py" in err[0], res.stderr[-2000:]
    assert "--trust-remote-code" in err[0] and "shipped code ran" not in res.stderr

    res = run_script("score_depth_plain.py", out, *args, "--trust-remote-code", tmp_path=tmp_path)
    assert res.returncode == 0 and "shipped code ran" in res.stderr, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["images"] == 1


def test_the_plain_scorers_import_no_dptune():
    """They are the independent check of an export: transformers, PIL, numpy (and yaml, torch) only."""
    import ast

    for name in ("score_plain.py", "score_depth_plain.py", "compare_backends.py"):
        tree_ = ast.parse((REPO / "scripts" / name).read_text())
        imported = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
                    for n in ast.walk(tree_) if isinstance(n, (ast.Import, ast.ImportFrom))
                    for a in (n.names if isinstance(n, ast.Import) else [n])}
        assert imported <= {"__future__", "argparse", "glob", "json", "sys", "pathlib", "numpy", "torch", "yaml",
                            "PIL", "transformers"}, (name, imported)


def test_an_upload_that_cannot_reach_the_hub_is_one_line(tmp_path):
    """--push-to-hub without a network (here: an endpoint nothing listens on) ends in one line that
    says the export itself is complete, not in the HTTP client's traceback."""
    import subprocess
    import sys

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    code = ("import sys, pathlib; from dptune.errors import ConfigError; from dptune.export import push_folder\n"
            "try:\n    push_folder(pathlib.Path(sys.argv[1]), 'me/x')\n"
            "except ConfigError as e:\n    print('error:', e)\n")
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_not_a_token", "HF_HUB_OFFLINE": "0"}
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stdout.strip()
    assert line.startswith("error: --push-to-hub me/x: the upload failed") and str(folder) in line
    assert line.count("\n") == 0


# ---------------------------------------------------------------------------- a damaged source
def test_a_truncated_checkpoint_is_one_line_naming_it_once(sources, tmp_path, capsys):
    trunc = tmp_path / "trunc.ckpt"
    trunc.write_bytes(sources["joint"].read_bytes()[:4096])
    rc, err = export_cli(capsys, trunc, tmp_path / "out")
    assert rc == 2 and len(err) == 1 and "not a readable checkpoint" in err[0], err
    assert err[0].count(str(trunc)) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_with_damaged_bytes_is_refused_by_its_checksums(sources, tmp_path, capsys):
    """Bytes changed inside a weight (a bad disk, a broken copy) were exported without a word: the zip
    format torch writes keeps a CRC-32 of each stored tensor, which nothing checked."""
    import struct
    import zipfile

    bad = tmp_path / "flipped.ckpt"
    data = bytearray(sources["joint"].read_bytes())
    with zipfile.ZipFile(sources["joint"]) as z:
        member = max(z.infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26: member.header_offset + 30])
    start = member.header_offset + 30 + name_len + extra_len + member.file_size // 2
    data[start: start + 64] = bytes(b ^ 0x5A for b in data[start: start + 64])
    bad.write_bytes(bytes(data))
    rc, err = export_cli(capsys, bad, tmp_path / "out")
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {bad}: damaged"), err
    assert "checksum" in err[0] and member.filename in err[0], err
    assert not (tmp_path / "out").exists()


def damaged(src: Path, where: Path, name: str, how) -> Path:
    """A copy of the exported directory ``src`` with its file ``name`` changed by ``how(path)``."""
    import shutil

    out = shutil.copytree(src, where)
    how(out / name)
    return out


@pytest.mark.parametrize("name, how, says", [
    ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-100]), "not a readable safetensors file"),
    ("model.safetensors", lambda p: p.unlink(), "no model.safetensors"),
    ("config.json", lambda p: p.unlink(), "no config.json"),
    ("config.json", lambda p: p.write_text('{"model_type": "dpt", '), "not valid JSON"),
    ("config.json", lambda p: p.write_text('{"hidden_size": 8}'), "no model_type"),
    ("preprocessor_config.json", lambda p: p.unlink(), "no preprocessor_config.json"),
    ("preprocessor_config.json", lambda p: p.write_bytes(b"\xff\xfe garbage"), "not valid JSON"),
    ("dptune.json", lambda p: p.write_text("[1, 2"), "not valid JSON"),
    ("dptune.json", lambda p: p.write_text('{"metrics": {}}'), "no labels"),
    # a processor size dptune cannot prepare images by: the export wrote a model predict then refused
    ("preprocessor_config.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()),
                                                                     "size": {"shortest_edge": 64}})),
     "gives its size as"),
])
def test_a_damaged_exported_directory_is_one_line_naming_the_file(sources, tmp_path, capsys, name, how, says):
    """Re-exporting a damaged export: one line naming the file and what is wrong with it, before any
    loader reads it (a truncated model.safetensors was safetensors' traceback; a missing config.json,
    transformers' "Unrecognized model ... model_type"), and nothing written."""
    src = damaged(sources["vit"], tmp_path / "src", name, how)
    rc, err = export_cli(capsys, src, tmp_path / "out")
    assert rc == 2 and len(err) == 1, err
    assert says in err[0] and name in err[0] and err[0].count(str(src)) == 1, err
    assert not (tmp_path / "out").exists()
    no_leftovers(tmp_path)


def test_a_joint_exported_directory_as_the_source_says_what_to_export(sources, tmp_path, capsys):
    joint = tmp_path / "joint"
    assert export_cli(capsys, sources["joint"], joint)[0] == 0
    rc, err = export_cli(capsys, joint, tmp_path / "out")
    assert rc == 2 and len(err) == 1 and "segmentation + depth export" in err[0], err
    assert str(joint / "segmentation") in err[0] and "checkpoint" in err[0], err
    rc, err = export_cli(capsys, joint / "depth", tmp_path / "depth")  # one part is an export of its own
    assert rc == 0, err
    assert json.loads((tmp_path / "depth" / "dptune.json").read_text())["task"] == "depth"


def test_an_export_never_goes_inside_another_export(sources, tmp_path, capsys):
    """OUT inside an exported model's folder (any: the source's or another's, a joint export's part,
    through a link) would be mixed into that model, and a later --overwrite of it refused for the
    stranger inside: one line, nothing written. predict and evaluate refuse the same (one check)."""
    xsrc = tmp_path / "xsrc"
    assert export_cli(capsys, sources["vit"], xsrc)[0] == 0
    joint = tmp_path / "joint"
    assert export_cli(capsys, sources["joint"], joint)[0] == 0
    (tmp_path / "link").symlink_to(xsrc)
    before = tree(tmp_path)
    for src, out, *opts in ((sources["joint"], xsrc / "sub"), (xsrc, xsrc / "a" / "b"),
                            (sources["vit"], tmp_path / "link" / "sub"),
                            (sources["vit"], joint / "segmentation", "--overwrite")):
        rc, err = export_cli(capsys, src, out, *opts)
        assert rc == 2 and len(err) == 1, (out, err)
        inside = joint if "joint" in str(out) else xsrc
        assert f"is inside {inside}, an exported model's folder" in err[0], err
    assert tree(tmp_path) == before
    rc, err = export_cli(capsys, xsrc, xsrc, "--overwrite")  # the export itself is still replaced as a whole
    assert rc == 0, err


def test_a_re_export_keeps_the_source_the_first_export_was_made_from(sources, tmp_path, capsys):
    """Re-exporting an export (to add a graph, in place or elsewhere) wrote the export folder as the
    source: the card said "Exported from `out`" and the record of the checkpoint it came from was gone."""
    first = tmp_path / "first"
    assert export_cli(capsys, sources["vit"], first)[0] == 0
    again = tmp_path / "again"
    assert export_cli(capsys, first, again)[0] == 0
    assert export_cli(capsys, first, first, "--overwrite")[0] == 0
    for out in (again, first):
        record = json.loads((out / "dptune.json").read_text())
        assert record["source"] == str(sources["vit"])
        assert f"Exported from `{sources['vit'].name}`" in (out / "README.md").read_text()
    assert json.loads((again / "dptune.json").read_text())["re_exported_from"] == str(first)


def test_the_staged_swap_refuses_a_concurrent_export_and_puts_the_earlier_one_back_when_interrupted(tmp_path,
                                                                                                    monkeypatch):
    """Two --overwrite exports into one folder at once: the first swapped the second's half-built folder aside
    and deleted it, and the second ended in a traceback. A Ctrl-C / SIGTERM between the moves of the swap left the
    earlier export half hidden. A folder made at a new export's path meanwhile was a raw errno naming the hidden
    staging folder (a user attack)."""
    from pathlib import Path

    from dptune.export.target import OutputDirError, staged

    target = tmp_path / "export"
    target.mkdir()
    for name in ("config.json", "model.safetensors", "dptune.json"):
        (target / name).write_text("earlier")
    with pytest.raises(OutputDirError, match="the hidden folder of an export writing there now"):
        with staged(target, replace=True) as stage:
            (stage / "config.json").write_text("new")
            other = target / ".dptune-export.0000beef.partial"
            other.mkdir()
            (other / "model.onnx").write_text("the other export's")
    assert (other / "model.onnx").read_text() == "the other export's"
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith(".")) == \
        ["config.json", "dptune.json", "model.safetensors"]
    other.joinpath("model.onnx").unlink()
    other.rmdir()
    rename, calls = Path.rename, []

    def interrupted_on_the_third(self, to):
        calls.append(self)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return rename(self, to)

    with pytest.raises(KeyboardInterrupt):
        with staged(target, replace=True) as stage:
            (stage / "config.json").write_text("new")
            monkeypatch.setattr(Path, "rename", interrupted_on_the_third)
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in target.iterdir() if p.is_file()} == \
        {"config.json": "earlier", "model.safetensors": "earlier", "dptune.json": "earlier"}
    fresh = tmp_path / "fresh"
    with pytest.raises(OutputDirError, match=f"{fresh}: notes.txt appeared there during the export"):
        with staged(fresh) as stage:
            (stage / "config.json").write_text("new")
            fresh.mkdir()
            (fresh / "notes.txt").write_text("mine")
    assert (fresh / "notes.txt").read_text() == "mine"


def test_what_a_stopped_export_left_is_named_with_what_to_do_and_never_deleted(tmp_path):
    """A kill -9 mid-export left its hidden folder: later exports there were refused as "holds files an export
    does not write", the hidden folder presented as the user's (a review). Whether another export (on this
    machine or another, in another container) still writes there cannot be told, and a ``.replaced`` folder may
    hold the only copy of the earlier export (a second review: clearing them lost it): named, with what to do,
    never deleted."""
    from dptune.export.target import OutputDirError, export_target

    src = tmp_path / "run.ckpt"
    src.write_text("x")
    for kind, says in (("partial", "delete it once no export is running there"),
                       ("replaced", "move them back up into the folder")):
        folder = tmp_path / kind
        hidden = folder / f".dptune-export.0a1b2c3d.{kind}"
        hidden.mkdir(parents=True)
        (hidden / "config.json").write_text("earlier")
        for overwrite in (False, True):
            with pytest.raises(OutputDirError, match=f"holds .dptune-export.0a1b2c3d.{kind}, .*{says}"):
                export_target(folder, src, overwrite=overwrite)
        assert (hidden / "config.json").read_text() == "earlier"
