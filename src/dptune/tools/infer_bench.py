"""Inference speed of an export: PyTorch eager, PyTorch compiled, ONNX Runtime fp32 / int8 (and fp16,
CUDA / TensorRT execution providers where present), in one run on one machine.

    python scripts/benchmark.py --infer EXPORT_DIR [--threads 2] [--batch 8] [--runs 50] [--json out.json]

For each engine: batch-1 latency (p50, p95 over ``--runs`` timed runs after ``--warmup``) at the
export's size and at a non-square size (the export's height x 1.5 its width, rounded to the patch
size; a graph that takes one size only is timed at it alone), and batch-N throughput (images/s) at
the export's size. The engines are interleaved in rounds (at least 3): each round gives every engine
a block of up to 5 timed runs in a row (the starting engine rotating), so a change in the machine's
load falls on every engine alike instead of on whichever ran at the time; each block starts once the
previous engine's worker threads have stopped spinning, with one untimed run. Per engine and size, ``cpu_per_wall`` is the process CPU time over the
wall time of its runs: about the thread count on an idle machine, lower when other processes take
the cores; the 1-minute load average before and after is recorded too. ``torch.compile``'s compile
time is reported apart from its runs (or why it did not compile). For a joint export torch runs the
joint model (one backbone pass, both heads), as the ONNX graph does. The CPU (model name, avx2 / avx512 /
vnni / amx flags), the threads and the versions are printed with the figures as one JSON document.
Inputs are random ``pixel_values``: speed does not depend on the pixels.

``--profile N`` adds, after the timing, N profiled batch-1 runs of each ONNX Runtime CPU graph at the
export's size (a graph that takes one batch or size only: at it; each entry records its batch and
size, and INT8 is compared with fp32 only at the same; ``dptune.tools.ort_profile``): milliseconds by operator type, the arithmetic
(convolutions, matrix products) apart from the rest, and how much faster INT8 makes each part.

The threads: ``--threads`` (default: ``OMP_NUM_THREADS``, else the cores this process may use), the
same number for torch's intra-op pool and ONNX Runtime's ``intra_op_num_threads``."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from dptune.cores import usable_cores
from dptune.errors import ConfigError, path_arg
from dptune.inference.onnx_runner import cpu_info
from dptune.tools.engine_rounds import load_average, versions
from dptune.tools.infer_engines import Inputs, ort_engines, profile_graphs, time_engines, torch_engines
from dptune.tools.infer_export import (
    PEAK_PER_INPUT,
    available_memory,
    expected_output,
    model_config,
    sizes,
    task_dir,
    torch_model,
)


def check_json_out(path: str, export: Path) -> None:
    """``--json``: a file in an existing folder, outside any export, never a file the benchmark did
    not write (it is replaced only when it holds an earlier benchmark's figures)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--json {path}: is a folder; give a file path")
    folder = p.resolve().parent
    if not folder.is_dir():
        raise ConfigError(f"--json {path}: its folder {p.parent} does not exist")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"--json {path}: its folder {p.parent} is not writable")
    from dptune.models.folders import refuse_model_folders

    refuse_model_folders(folder, "--json")
    if p.is_file():  # a pipe, /dev/stdout or a terminal is written to, never read (reading one waits for input)
        try:
            ours = p.stat().st_size < 10 * 2**20 and {"engines", "export", "threads"} <= set(json.loads(p.read_text()))
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise ConfigError(f"--json {path}: exists and was not written by benchmark --infer; it is left as it "
                              "is (give a new file name)")


ENGINES = ("eager", "compiled", "ort-fp32", "ort-int8", "ort-fp16")


def default_threads() -> int:
    """``OMP_NUM_THREADS`` (at most the usable cores) when it is a positive number, else the usable cores."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS") or 0)
    except ValueError:
        n = 0
    return min(n, usable_cores()) if n > 0 else usable_cores()


PROFILE_MIN, PROFILE_MAX = 5, 100


def check_options(args) -> None:
    """One line for options that cannot be measured with, before anything is loaded or timed."""
    for name, value, least in (("--batch", args.batch, 1), ("--runs", args.runs, 1), ("--warmup", args.warmup, 0)):
        if value < least:
            raise ConfigError(f"{name} must be at least {least}, got {value}")
    # fewer runs are noise (one run's nodes vary by 5x); each profiled run adds about 1 MB of trace per graph
    if args.profile and not PROFILE_MIN <= args.profile <= PROFILE_MAX:
        raise ConfigError(f"--profile must be 0 (no profile) or between {PROFILE_MIN} and {PROFILE_MAX} runs, got "
                          f"{args.profile}")
    cores = usable_cores()
    if args.threads is not None and not 1 <= args.threads <= cores:
        raise ConfigError(f"--threads must be between 1 and the {cores} core{'s' if cores != 1 else ''} this process "
                          f"may use, got {args.threads}")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise ConfigError(f"--engines {args.engines}: " + (f"unknown {', '.join(unknown)}; " if unknown else "none named; ")
                          + f"choose from {', '.join(ENGINES)}")
    if args.profile and not {"ort-fp32", "ort-int8"} & set(engines):
        raise ConfigError(f"--profile profiles the ONNX Runtime CPU graphs: name ort-fp32 or ort-int8 in --engines "
                          f"(given {args.engines})")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--infer", metavar="EXPORT_DIR", help="an export directory (scripts/export.py); required")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of torch and ONNX Runtime, 1 to the cores this process may use (default: "
                         "OMP_NUM_THREADS, else those cores)")
    ap.add_argument("--batch", type=int, default=8, help="batch of the throughput runs (at least 1)")
    ap.add_argument("--runs", type=int, default=50, help="timed batch-1 runs per engine and size (at least 1)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help="comma-separated subset (a missing graph or provider is skipped and said)")
    ap.add_argument("--json", type=path_arg, help="also write the results here")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help=f"after the timing, N ({PROFILE_MIN} to {PROFILE_MAX}) profiled batch-1 runs of each ONNX "
                         "Runtime CPU graph at the export's size (a graph that takes one batch or size: at it, "
                         "recorded), after at least one untimed run: time by operator "
                         "type, the integer and float arithmetic (convolutions, matrix products) apart from the rest, "
                         "and for INT8 how much faster each part is (default 0: no profile)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--infer" in argv and argv.index("--infer") + 1 < len(argv) and argv[argv.index("--infer") + 1] in ("-h", "--help"):
        ap.print_help()  # "--infer --help": the help, not "expected one argument"
        return 0
    args = ap.parse_args(argv)
    if not args.infer:
        ap.error("--infer EXPORT_DIR is required")
    try:
        check_options(args)
        if args.json:
            check_json_out(args.json, Path(args.infer))
        result = run(Path(args.infer), args, command="dptune benchmark " + shlex.join(argv))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was measured to the end{' and ' + args.json + ' was not written' if args.json else ''}",
              file=sys.stderr)
        return 130
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        try:
            Path(args.json).write_text(text + "\n")
        except OSError as e:  # checked before timing; the disk may have filled or the folder gone since
            print(f"error: --json {args.json}: could not be written ({e.strerror or e}); the figures are above",
                  file=sys.stderr)
            return 1
    failed = [v for v in result.get("profile", {}).values() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0  # a graph that could not be profiled was said above


def run(export: Path, args, command: str = "") -> dict:
    """Every engine named in ``--engines`` timed at the export's size, a non-square size and batch N,
    interleaved; the figures as one dict (what could not run is said in it)."""
    from dptune.inference.onnx_runner import config_classes, graphs_in

    if not export.is_dir():
        raise ConfigError(f"{export}: not a directory")
    if graphs_in(export):
        raise ConfigError(f"{export}: is one part of the joint export {export.parent}, whose graph computes both "
                          f"tasks; benchmark {export.parent}")
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    part = task_dir(export)
    # each task's config, read once: the size multiple and the outputs every graph must give
    configs = [model_config(d) for d in ([part] if part == export else [export / "segmentation", export / "depth"])]
    square, wide = sizes(part, configs[0])
    need = args.batch * 3 * square[0] * square[1] * 4 * PEAK_PER_INPUT
    free = available_memory()
    if free and need > free:
        raise ConfigError(f"--batch {args.batch}: a batch that large needs about {need / 2**30:.1f} GiB at "
                          f"{square[0]}x{square[1]} (about {PEAK_PER_INPUT}x its input), more than the "
                          f"{free / 2**30:.2f} GiB of memory available here; give a smaller --batch")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    out: dict = {"export": str(export), "threads": threads,
                 "threads_note": "the same count for torch (set_num_threads) and ONNX Runtime (intra_op_num_threads)",
                 "cpu": cpu_info(), "versions": versions(),
                 "sizes": {"export": list(square), "non_square": list(wide)}, "batch": args.batch, "engines": {},
                 "timing": "interleaved in rounds (at least 3): each engine a block of up to 5 timed runs in a row, after the previous engine's threads stopped spinning and one untimed run; the first engine rotating", "command": command}
    if part != export:
        out["note"] = "joint export: torch runs the joint model (both heads, one backbone pass), as the ONNX graphs do"
    inputs = Inputs()
    fns: dict = {}  # engine -> (run on a numpy batch, the one size it takes or None, the one batch or None)
    if {"eager", "compiled"} & set(engines):
        fns.update(torch_engines(engines, torch_model(export, part), lambda: inputs(1, square), out["engines"]))
    outputs = [expected_output(c) for c in configs]
    # the classes as config.json names them (transformers would default to 2 without)
    fns.update(ort_engines(export, engines, threads, outputs, config_classes(part), out))
    out["load_average_1min"] = {"before": load_average()}
    time_engines(fns, args, inputs, {"export_size": (square, 1), "non_square": (wide, 1),
                                     "throughput": (square, args.batch)}, out["engines"])
    out["load_average_1min"]["after"] = load_average()
    if not any("p50_ms" in row or "images_per_s" in row for e in out["engines"].values() for row in e.values()
               if isinstance(row, dict)):
        said = "; ".join(f"{k}: {v.get('skipped') or next((r['skipped'] for r in v.values() if isinstance(r, dict)), '')}"
                         for k, v in out["engines"].items())
        raise ConfigError(f"{export}: no engine could be timed ({said})")
    if args.profile:
        out["profile"] = profile_graphs(fns, args, inputs, square, threads)
    eager = out["engines"].get("ort-fp32", {}).get("export_size", {}).get("p50_ms")
    int8 = out["engines"].get("ort-int8", {}).get("export_size", {}).get("p50_ms")
    if eager and int8:
        out["int8_speedup_vs_fp32_batch1"] = eager / int8
    return out


if __name__ == "__main__":
    sys.exit(main())
