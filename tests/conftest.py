"""Shared fixtures: tiny DPT configs and the real datasets in ../shared/data (read in place)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _shared() -> Path:
    """The read-only datasets beside the checkout (or wherever DPTUNE_SHARED points). Outside CI a
    developer's other checkout may borrow /work/shared; CI takes only what it was given."""
    if os.environ.get("DPTUNE_SHARED"):
        return Path(os.environ["DPTUNE_SHARED"])
    candidates = (REPO.parent / "shared",) if IN_CI else (REPO.parent / "shared", Path("/work/shared"))
    for candidate in candidates:
        if (candidate / "data").is_dir():
            return candidate
    return REPO.parent / "shared"


SHARED = _shared()
CAMVID = SHARED / "data" / "camvid"
DUBAI = SHARED / "data" / "dubai-aerial"
KITCHEN = SHARED / "data" / "7scenes-kitchen"
DEPTH_FORMATS = SHARED / "data" / "depth-formats"
DATASETS = (CAMVID, DUBAI, KITCHEN, DEPTH_FORMATS)  # what the suite reads; tests that need one skip without it, except in CI


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per core this process may use (affinity, cgroup quota); xdist's own count
    reads the machine's physical cores where psutil is installed, a container's share nowhere."""
    from dptune.cores import usable_cores

    return usable_cores()


def pytest_configure(config) -> None:
    """Under pytest-xdist (the README's ``-n auto``) each worker takes its own share of the cores
    (affinity, which the subprocesses it starts inherit) and as many torch threads: two workers with
    one core each get through the suite faster than one with two cores (a training step gains 1.4x
    from the second thread, not 2x), and two workers with all the cores would fight over them. With
    more workers than cores, workers share a core each, round robin."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores, index = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw"))
    share = cores[index % count::count] if count <= len(cores) else [cores[index % len(cores)]]
    os.sched_setaffinity(0, share)
    import torch

    torch.set_num_threads(len(share))


_WARM = None


def run_python(script: Path, args: list[str], cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``subprocess.run([python, script, *args], capture_output=True, text=True)``, forked from a warm
    Python that imported torch, Lightning, transformers and dptune once (``warm_python.py``): a fresh
    interpreter spends about 10 s of a core importing them, and the suite starts dozens of runs.
    ``DPTUNE_TEST_FRESH=1`` starts every run as a plain subprocess; so does a warm Python that cannot
    fork safely."""
    global _WARM
    env = dict(os.environ if env is None else env)
    if os.environ.get("DPTUNE_TEST_FRESH") != "1":
        if _WARM is None:
            import atexit

            from warm_python import WarmPython

            _WARM = WarmPython()
            atexit.register(_WARM.close)
        proc = _WARM.run(str(script), [str(a) for a in args], cwd, env, timeout, Path(tempfile.gettempdir()))
        if proc is not None:
            return proc
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def pytest_sessionstart(session) -> None:
    """In CI (CI=true) missing data fails the run instead of skipping a third of the suite."""
    missing = [str(p) for p in DATASETS if not p.is_dir()]
    if IN_CI and missing:
        pytest.exit(f"CI=true but the test data is missing: {', '.join(missing)} (expected ../shared/data beside "
                    "the checkout, or DPTUNE_SHARED)", returncode=1)

TINY = {
    "model_type": "dpt",
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 64,
    "patch_size": 16,
    "backbone_out_indices": [0, 1, 2, 3],
    "neck_hidden_sizes": [8, 16, 32, 32],
    "fusion_hidden_size": 16,
    "reassemble_factors": [4, 2, 1, 0.5],
    "use_auxiliary_head": True,
    "semantic_loss_ignore_index": 255,
}


def needs(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present")


@pytest.fixture
def tiny_config() -> dict:
    return dict(TINY)


@pytest.fixture
def tiny_config_path(tmp_path: Path) -> Path:
    p = tmp_path / "dpt-tiny.json"
    p.write_text(json.dumps(TINY))
    return p


def camvid_subset(root: Path, frames: list[Path], images: str = "val", masks: str = "valannot",
                  short: int | None = None) -> Path | None:
    """A CamVid folder of ``frames`` (symlinks to the shared files: ``root/images/*.jpg``,
    ``root/masks/{stem}.png``, ``root/labels.yaml``). With ``short``, frame ``short``'s mask is a
    real file 10 rows short of its image; its path is returned."""
    from PIL import Image

    (root / images).mkdir(parents=True)
    (root / masks).mkdir()
    (root / "labels.yaml").symlink_to(CAMVID / "labels.yaml")
    for p in frames:
        (root / images / p.name).symlink_to(p)
        (root / masks / f"{p.stem}.png").symlink_to(CAMVID / "valannot" / f"{p.stem}.png")
    if short is None:
        return None
    bad = root / masks / f"{frames[short].stem}.png"
    bad.unlink()
    Image.open(CAMVID / "valannot" / f"{frames[short].stem}.png").crop((0, 0, 480, 350)).save(bad)
    return bad
