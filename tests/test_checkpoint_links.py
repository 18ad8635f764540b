"""``last.ckpt`` of a step that wrote the best checkpoint is that file, linked, not written a second time
(``dptune.training.checkpoint_state.twin_file``): the same state, read and resumed as before."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_resume import quickstart

from dptune.training.checkpoint_state import same_file, twin_file

EVERY_BEST = ("--checkpoint.monitor", "step", "--checkpoint.mode", "max")  # each validation a new best
FIRST_BEST = ("--checkpoint.monitor", "step", "--checkpoint.mode", "min")  # the first validation stays best


def _files(run: Path) -> tuple[Path, list[Path]]:
    folder = run / "checkpoints"
    return folder / "last.ckpt", sorted(p for p in folder.glob("*.ckpt") if p.name != "last.ckpt")


def _state(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    (own,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("Checkpoint")]
    return {"step": ckpt["global_step"], **own}


def test_last_of_a_step_that_wrote_the_best_is_that_file_written_once(tmp_path):
    """3 epochs, each a new best: last.ckpt is the best file (one inode), and its state names last.ckpt as
    the last checkpoint and the best file as the best, as a last.ckpt written on its own did."""
    run = tmp_path / "run"
    quickstart(run, 3, *EVERY_BEST)
    last, (best,) = _files(run)
    assert os.path.samefile(last, best)
    state = _state(last)
    assert state["step"] == 12 and state["last_model_path"] == str(last) and state["best_model_path"] == str(best)
    assert not list(last.parent.glob("*.partial"))

    # resumed: the next best replaces the old one; last.ckpt follows it; the old best's bytes are gone with it
    quickstart(run, 4, *EVERY_BEST, "--ckpt_path", "last")
    last, (best2,) = _files(run)
    assert best2 != best and not best.exists() and os.path.samefile(last, best2)
    assert _state(last)["step"] == 16 and not list(last.parent.glob("last-v*.ckpt"))


def test_a_last_checkpoint_of_a_step_without_a_best_is_written_whole(tmp_path):
    run = tmp_path / "run"
    quickstart(run, 3, *FIRST_BEST)
    last, (best,) = _files(run)
    assert not os.path.samefile(last, best)
    assert _state(last)["step"] == 12 and _state(best)["step"] == 4


def test_the_first_pair_of_a_run_is_written_twice():
    """The step's best file named no last checkpoint yet (``""``): linked, last.ckpt would say so, and a
    resume into the same folder would take the existing last.ckpt for another run's (last-v1.ckpt)."""
    assert twin_file((2, "/r/best.ckpt", ""), 2, "/r/last.ckpt", 1) is None
    assert twin_file((4, "/r/best.ckpt", "/r/last.ckpt"), 4, "/r/last.ckpt", 1) == "/r/best.ckpt"


@pytest.mark.parametrize("written, step, last, callbacks", [
    ((4, "/r/best.ckpt", "/r/last.ckpt"), 5, "/r/last.ckpt", 1),        # written at another step
    ((4, "/r/last.ckpt", "/r/last.ckpt"), 4, "/r/last.ckpt", 1),        # last.ckpt itself
    ((4, "/r/best.ckpt", "/r/last.ckpt"), 4, "/r/last.ckpt", 2),        # another callback's state may differ
    ((4, "s3://b/best.ckpt", "s3://b/last.ckpt"), 4, "s3://b/last.ckpt", 1),  # remote: no links
    (None, 4, "/r/last.ckpt", 1),
])
def test_a_last_checkpoint_whose_state_may_differ_is_written_whole(written, step, last, callbacks):
    assert twin_file(written, step, last, callbacks) is None


def test_without_hard_links_the_bytes_are_copied(tmp_path, monkeypatch):
    source, path = tmp_path / "best.ckpt", tmp_path / "last.ckpt.partial"
    source.write_bytes(b"state" * 1000)
    path.write_text("an earlier partial file")

    def no_links(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    same_file(str(source), str(path))
    assert path.read_bytes() == source.read_bytes() and not os.path.samefile(source, path)


def test_a_run_with_a_time_limit_writes_both_files(tmp_path):
    """Lightning's Timer (``max_time``) records the time trained at each write: a link would hold the
    best file's earlier time (a review's probe: 0.96 against 1.14 s)."""
    run = tmp_path / "run"
    quickstart(run, 2, *EVERY_BEST, "--trainer.max_time", "00:00:10:00")
    last, (best,) = _files(run)
    assert not os.path.samefile(last, best) and _state(last)["step"] == _state(best)["step"] == 8
    assert twin_file((4, "/r/best.ckpt", "/r/last.ckpt"), 4, "/r/last.ckpt", 1, clocked=True) is None


def test_a_copy_that_fails_leaves_no_half_file(tmp_path, monkeypatch):
    import shutil

    source, path = tmp_path / "best.ckpt", tmp_path / "last.ckpt.partial"
    source.write_bytes(b"state" * 1000)

    def no_links(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    def disk_full(src, dst):
        Path(dst).write_bytes(b"sta")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(shutil, "copyfile", disk_full)
    with pytest.raises(OSError, match="No space"):
        same_file(str(source), str(path))
    assert not path.exists() and source.read_bytes() == b"state" * 1000


def test_a_state_saved_under_the_other_mode_keeps_its_files_ranked_by_the_new_one(tmp_path):
    """Re-keyed as it was, the top-k bookkeeping of a run saved under mode max was read under min: its k-th (the
    lowest loss, the best now) was the first file deleted, and a better epoch was not saved (a review)."""
    from dptune.training.checkpointing import Checkpoint

    cb = Checkpoint(dirpath=str(tmp_path), monitor="val/loss", mode="min", save_top_k=2)
    a, b = str(tmp_path / "best-00-5.0.ckpt"), str(tmp_path / "best-01-4.0.ckpt")
    saved = {"monitor": "val/loss", "best_model_score": torch.tensor(5.0), "best_model_path": a,
             "current_score": torch.tensor(2.0), "dirpath": str(tmp_path), "best_k_models": {a: torch.tensor(5.0),
             b: torch.tensor(4.0)}, "kth_best_model_path": b, "kth_value": torch.tensor(4.0), "last_model_path": ""}
    earlier = cb.state_key.replace("'mode': 'min'", "'mode': 'max'")
    checkpoint = {"callbacks": {earlier: saved}}
    cb.on_load_checkpoint(None, None, checkpoint)
    cb.load_state_dict(checkpoint["callbacks"][cb.state_key])
    assert (cb.best_model_path, float(cb.best_model_score)) == (b, 4.0)
    assert (cb.kth_best_model_path, float(cb.kth_value)) == (a, 5.0)
