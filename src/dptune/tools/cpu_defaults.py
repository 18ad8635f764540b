"""The CPU-dependent defaults of a training run, measured on the machine this runs on.

    python -m dptune.tools.cpu_defaults --root ../shared/data/camvid --json cpu.json
    python -m dptune.tools.cpu_defaults --root ../shared/data/camvid --isa avx2   # the AVX2 dispatch

Two kinds of rows, each in a fresh process, one after the other:

- **step** rows (``dptune benchmark`` on the bench-tiny CamVid model, crop 192, batch 8): the
  training step alone, for what the model's arithmetic decides -- precision, intra-op threads,
  channels-last, the attention kernel, ``torch.compile``. ``wall s`` is the whole process (start-up, compile, warm-up
  and timed steps), so a compile's cost is the difference of two rows' ``wall s``.
- **run** rows (``dptune fit --config configs/camvid.yaml``, two epochs with validation): the whole
  command, for what the loader decides -- worker processes and the decoded-sample cache.

``--isa avx2`` runs every row under oneDNN's and ATen's AVX2 dispatch (``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2``): the kernels an AVX2-only CPU runs, on this CPU's clock and caches. It
is a simulation of such a CPU, not one, and the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dptune.errors import path_arg

REPO = Path(__file__).resolve().parents[3]
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
STEP = ["--num-labels", "11", "--crop", "192", "--batch", "8", "--steps", "8", "--warmup", "2"]
# (row, setting changed from the defaults, extra options, extra environment)
STEP_ROWS = [
    ("step", "defaults (precision auto, threads = usable cores)", [], {}),
    ("step", "precision 32-true", ["--precision", "32-true"], {}),
    ("step", "1 intra-op thread", [], {"OMP_NUM_THREADS": "1"}),
    ("step", "channels-last", ["--channels-last"], {}),
    ("step", "sdpa attention (auto: eager in bfloat16 on a CPU)", ["--attention", "sdpa"], {}),
    ("step", "torch.compile (inductor)", ["--compile"], {}),
]
RUN_ROWS = [
    ("run", "defaults (no workers on <= 2 cores, in-memory cache)", [], {}),
    ("run", "1 loader worker", ["--data.num_workers", "1"], {}),
    ("run", "2 loader workers", ["--data.num_workers", "2"], {}),
    ("run", "no cache", ["--data.cache", "false"], {}),
]


def cpu_model() -> tuple[str, list[str]]:
    """The CPU's model name and the vector-extension flags that decide the kernels."""
    name, flags = platform.processor() or "cpu", []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = sorted(f for f in line.split(":", 1)[1].split()
                               if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
                break
    except OSError:
        pass
    return name, flags


def timed(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, int]:
    """Wall seconds of ``cmd`` and its exit status; its output goes to ``log``."""
    start = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO).returncode
    return time.perf_counter() - start, rc


def step_row(model: str, opts: list[str], env: dict[str, str], tmp: Path, n: int) -> dict:
    out = tmp / f"step{n}.json"
    cmd = [sys.executable, "-m", "dptune.command", "benchmark", "--model", model, *STEP, *opts, "--json", str(out)]
    wall, rc = timed(cmd, env, tmp / f"step{n}.log")
    if rc or not out.exists():
        return {"wall_s": wall, "error": f"exit {rc}, see {tmp / f'step{n}.log'}"}
    r = json.loads(out.read_text())
    return {"wall_s": wall, "precision": r["precision"], "images_per_s": r["dptune"].get("images_per_s"),
            "error": r["dptune"].get("error")}


def run_row(root: str, model: str, opts: list[str], env: dict[str, str], tmp: Path, n: int, epochs: int) -> dict:
    images = sum(len(list((Path(root) / split).glob("*.png")) or list((Path(root) / split).glob("*.jpg")))
                 for split in ("train", "val"))
    cmd = [sys.executable, "-m", "dptune.command", "fit", "--config", str(REPO / "configs" / "camvid.yaml"),
           "--data.root", root, "--model.config", model, "--trainer.max_epochs", str(epochs),
           "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
           "--trainer.default_root_dir", str(tmp / f"run{n}"), *opts]
    wall, rc = timed(cmd, env, tmp / f"run{n}.log")
    if rc:
        return {"wall_s": wall, "error": f"exit {rc}, see {tmp / f'run{n}.log'}"}
    return {"wall_s": wall, "images_per_s": epochs * images / wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "camvid"), help="CamVid (run rows)")
    ap.add_argument("--model", default=str(REPO.parent / "shared" / "bench" / "dpt-bench-tiny.json"))
    ap.add_argument("--isa", choices=["native", "avx2"], default="native")
    ap.add_argument("--rows", choices=["all", "step", "run"], default="all")
    ap.add_argument("--epochs", type=int, default=2, help="run rows: epochs of the CamVid recipe")
    ap.add_argument("--json", type=path_arg, help="write the rows here too")
    args = ap.parse_args(argv)
    if not Path(args.model).is_file():
        print(f"error: --model {args.model}: no such DPTConfig JSON", file=sys.stderr)
        return 2
    if args.rows != "step" and not (Path(args.root) / "train").is_dir():
        print(f"error: --root {args.root}: no train/ folder (CamVid layout, see configs/camvid.yaml)", file=sys.stderr)
        return 2
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", *AVX2)}
    base.update(AVX2 if args.isa == "avx2" else {}, WANDB_MODE="disabled")
    name, flags = cpu_model()
    rows = (STEP_ROWS if args.rows != "run" else []) + (RUN_ROWS if args.rows != "step" else [])
    tmp = Path(tempfile.mkdtemp(prefix="dptune-cpu-"))
    isa = "AVX2 dispatch (simulated)" if args.isa == "avx2" else "native"
    print(f"# {name} ({' '.join(flags)}), {os.cpu_count()} CPUs, {isa}, {time.strftime('%Y-%m-%d')}")
    print("| kind | setting | precision | images/s | wall s |\n| --- | --- | --- | ---: | ---: |")
    results = []
    for n, (kind, what, opts, env) in enumerate(rows):
        env = {**base, **env}
        r = (step_row(args.model, opts, env, tmp, n) if kind == "step"
             else run_row(args.root, args.model, opts, env, tmp, n, args.epochs))
        r.update(kind=kind, setting=what)
        results.append(r)
        ips = f"{r['images_per_s']:.2f}" if r.get("images_per_s") else r.get("error", "-")
        print(f"| {kind} | {what} | {r.get('precision', 'auto')} | {ips} | {r['wall_s']:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": name, "flags": flags, "isa": isa, "rows": results,
                                               "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
