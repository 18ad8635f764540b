"""What a checkpoint callback's state and names hold: checkpoint paths followed to the folder a run
was moved to (``follow_moved``), and logged values' names as filename template fields (``template_field``)."""

from __future__ import annotations

import os
from typing import Any

# what Lightning's filename template cannot hold in a field name ({0[name]:.4f}), percent-encoded
_UNSAFE_IN_FIELD = {c: f"%{ord(c):02X}" for c in "%[]{}:"}


def follow_moved(state: dict[str, Any], old: str, new: str, mode: str) -> dict[str, Any] | None:
    """``state`` (a ModelCheckpoint's) with its checkpoint paths in ``old`` moved to ``new``; None when
    none of them is in ``new`` (not a moved run's folder). A top-k file the run removed after this
    state was written (resuming a best-*.ckpt) leaves the record; the best and k-th best are then
    those of the files there (``mode``: max or min)."""

    def moved(path: str) -> str | None:
        if not path or os.path.normpath(os.path.dirname(path)) != os.path.normpath(old):
            return None
        there = os.path.join(new, os.path.basename(path))
        return there if os.path.isfile(there) else None

    found = {p: moved(p) for p in [state.get("best_model_path"), state.get("kth_best_model_path"),
                                   state.get("last_model_path"), *(state.get("best_k_models") or {})] if p}
    if not any(found.values()):
        return None
    best_k = {found[p]: v for p, v in (state.get("best_k_models") or {}).items() if found.get(p)}
    out = {**state, "best_k_models": best_k, "dirpath": new, "last_model_path": found.get(state.get("last_model_path")) or ""}
    ranked = sorted(best_k, key=lambda p: float(best_k[p]), reverse=mode == "max")
    best = found.get(state.get("best_model_path")) or (ranked[0] if ranked else "")
    out.update(best_model_path=best, best_model_score=best_k.get(best, state.get("best_model_score") if best else None),
               kth_best_model_path=ranked[-1] if ranked else "")
    out.pop("kth_value", None)
    if ranked:
        out["kth_value"] = best_k[ranked[-1]]
    return out


def template_field(key: str) -> str:
    """``key`` (a logged value's name) as a field of a checkpoint filename template:
    ``{template_field("val/IoU/Tree[s]")}`` is ``{val/IoU/Tree%5Bs%5D}``, which ``Checkpoint`` fills in
    with the value of ``val/IoU/Tree[s]``. Keys without those characters are unchanged."""
    return "".join(_UNSAFE_IN_FIELD.get(c, c) for c in key)


def same_file(source: str, path: str) -> None:
    """``path`` made the same file as ``source`` (a hard link: no bytes written, and either name can be
    removed or replaced without the other), or a copy of its bytes where the file system has no hard
    links. Whatever was at ``path`` is replaced."""
    import shutil

    if os.path.lexists(path):
        os.remove(path)
    try:
        os.link(source, path)
    except OSError:
        try:
            shutil.copyfile(source, path)
        except BaseException:  # a full disk: no half copy left behind
            if os.path.lexists(path):
                os.remove(path)
            raise


def twin_file(written: tuple[int, str, str] | None, step: int, last: str, callbacks: int,
              clocked: bool = False) -> str | None:
    """The file a step wrote already that holds what its ``last.ckpt`` would: the step's best checkpoint,
    written (``written``: its step, its path, the last checkpoint its state named) with this same
    ``last.ckpt`` named as the last one (every such pair of a run but its first). Each file holds the
    trainer's whole state, and nothing changes between the two writes of one step (the callback's own
    state names its best and last files, the same in both); the second write of the same bytes took about
    as long as the first (0.5 s for the 7-Scenes recipe's 55 MB here), in every epoch that improved. None
    where the state could differ or the file cannot be linked: another step, another checkpoint callback
    (``callbacks`` > 1: its state may change between the two writes), state that follows the clock
    (``clocked``: Lightning's ``Timer`` of ``max_time`` records the time trained at each write), a remote
    folder."""
    if written is None or callbacks != 1 or clocked or "://" in last and not last.startswith("file://"):
        return None
    at, path, last_then = written
    return path if at == step and path != last and last_then == last else None
