"""Look at a dataset before training on it: sizes, class frequencies, bad masks, class weights;
for depth, the share of valid depth pixels and the valid depth range in metres.

    python scripts/inspect_data.py configs/camvid.yaml --root ../shared/data/camvid
    python scripts/inspect_data.py configs/camvid.yaml --class-weights median --out weights.yaml
    python train.py fit --config configs/camvid.yaml --config weights.yaml
    python scripts/inspect_data.py configs/depth/7scenes.yaml --root ../shared/data/7scenes-kitchen
    python scripts/inspect_data.py configs/multitask/camvid-7scenes.yaml

Reads the ``data:`` section of a train.py config of any task (no train.py needed), through the
task's own datamodule: a multitask config gets each source's report (classes for segmentation
sources, depth for depth sources, both for depth sources with masks). Class weights are for
segmentation configs only. Exit status: 0 clean, 1 some samples are bad, 2 an error.

Images are measured upright (their EXIF orientation applied, as training reads them); ``*.jpg``
takes ``.JPG`` too (``.jpeg`` files beside are counted in a warning). ``--out`` may not be the config
nor a file it names (its label file, ...) nor lie in a folder of the data's images or masks
(refused in one line before the scan), and replaces an existing file only when it is inspect's own
weights fragment, or with ``--overwrite``; it replaces the directory entry (a link there is
replaced, never written through).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import yaml

from dptune import TASKS
from dptune.data.base import STAGES
from dptune.errors import ConfigError, DataError, path_arg
from dptune.tools.split_stats import (
    SplitStats,
    class_weights,
    format_depth_report,
    format_report,
    inspect_depth_split,
    inspect_split,
)

KINDS = {"segmentation": "segmentation", "depth": "depth", "both": "depth + segmentation"}  # of a multitask source
BUILDS = {"train": "fit", "val": "validate", "test": "test"}  # the Lightning stage that builds each split


def segmentation_sources(dm: Any, stages: list[str]) -> dict[str, Any]:
    """The source of each split of a SegmentationDataModule that ``stages`` names."""
    from dptune.data.sources import build_source

    return {stage: build_source(dm.source_kind, dict(dm.splits[stage]), dm.root, dm.label_set.mask_format == "rgb",
                                stage, dm.hf) for stage in stages if stage in dm.splits}


def report_segmentation(dm: Any, stages: list[str], sources: dict[str, Any] | None = None) -> dict[str, SplitStats]:
    """Class statistics of each split of a SegmentationDataModule, printed as they come."""
    results = {}
    for stage, src in (sources if sources is not None else segmentation_sources(dm, stages)).items():
        results[stage] = inspect_split(stage, src, dm.label_set)
        print(format_report(results[stage], dm.label_set))
    return results


def report_depth(dm: Any, stages: list[str], depth_range: tuple[float, float | None] | None = None) -> list[list[str]]:
    """Depth statistics (and class counts of samples that carry masks) of each split of a
    DepthDataModule, read by its own datasets; the problems of each split."""
    problems = []
    for stage in stages:
        if stage in dm.splits:
            dm.setup(BUILDS[stage])
            stats, classes = inspect_depth_split(stage, dm.datasets[stage], depth_range=depth_range)
            print(format_depth_report(stats, classes, dm.label_set))
            problems.append(stats.problems)
    return problems


def quiet(spec: dict[str, Any]) -> dict[str, Any]:
    """A datamodule's settings for inspection: no pre-flight check, no cache (this reads every file
    once), no loader workers (whatever the config sets: a config with num_workers was refused)."""
    return {**spec, "check": False, "cache": False, "num_workers": 0}


def inspect_config(task: str, data: dict[str, Any], stages: list[str],
                   check_out: Callable[[list[str]], None] | None = None,
                   depth_range: tuple[float, float | None] | None = None,
                   named: bool = False) -> tuple[dict[str, SplitStats], bool]:
    """Print the report of a config's data; (segmentation results by split, whether any sample is bad).
    ``named``: the user named the ``stages`` (each must be there), else the splits of the three there are.
    ``check_out`` (segmentation) sees the data's files before any is read; ``depth_range``: the
    model's (min_depth, max_depth), reported against the depth maps."""
    if task == "segmentation":
        from dptune.data.datamodule import SegmentationDataModule

        dm = SegmentationDataModule(**quiet(data))
        check_splits(stages, named, dm.splits)
        sources = segmentation_sources(dm, stages)
        if check_out is not None:
            check_out([f for s in sources.values() for a in ("images", "masks") for f in getattr(s, a, None) or []])
        results = report_segmentation(dm, stages, sources)
        return results, any(r.problems for r in results.values())
    if task == "depth":
        from dptune.data.depth_datamodule import DepthDataModule

        dm = DepthDataModule(**quiet(data))
        check_splits(stages, named, dm.splits)
        return {}, any(report_depth(dm, stages, depth_range))
    from dptune.data.multitask_datamodule import MultiTaskDataModule

    for key in ("segmentation", "depth"):
        specs = data.get(key)
        if specs:
            data[key] = [quiet(s) for s in specs] if isinstance(specs, list) else quiet(specs)
    dm, bad = MultiTaskDataModule(**{**data, "num_workers": 0}), False
    check_splits(stages, named, {stage for s in dm.sources for stage in s.dm.splits})
    for s in dm.sources:
        print(f"### {s.name} ({KINDS[s.kind]})")
        if s.kind == "segmentation":
            bad |= any(r.problems for r in report_segmentation(s.dm, stages).values())
        else:
            bad |= any(report_depth(s.dm, stages, depth_range))
    return {}, bad


def check_splits(stages: list[str], named: bool, there) -> None:
    """Each split the user named (``--splits``) is in the config (``there``), and a report without
    one (the default: those of train, val, test the config has) reports something."""
    absent = [s for s in stages if s not in there]
    if absent and (named or len(absent) == len(stages)):
        raise ConfigError(f"--splits: the config has no {absent[0]} split (data.splits: {', '.join(there) or 'none'})")


def model_depth_range(cfg: dict[str, Any], where: str) -> tuple[float, float | None]:
    """The config's model.min_depth / model.max_depth (the depth models' defaults where left out)."""
    from dptune.metrics.depth import MIN_DEPTH, check_range

    model = cfg.get("model")
    if model is None:
        return MIN_DEPTH, None
    if not isinstance(model, dict):
        raise ConfigError(f"{where}: model: must be a mapping of model settings, got {type(model).__name__}")
    lo, hi = model.get("min_depth", MIN_DEPTH), model.get("max_depth")
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in (lo, hi) if v is not None):
        raise ConfigError(f"{where}: model.min_depth / model.max_depth must be numbers (metres), got "
                          f"{lo!r} / {hi!r}")
    try:
        check_range(float(lo), None if hi is None else float(hi))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return float(lo), None if hi is None else float(hi)


def refusal(args: argparse.Namespace, task: str) -> str | None:
    """Why the options cannot work for this config's task, or None."""
    if task not in TASKS:
        return f"{args.config}: task {task!r} is not one of {', '.join(TASKS)}"
    if args.class_weights and task != "segmentation":
        return (f"--class-weights is for segmentation configs; {args.config} is a {task} config "
                "(its model takes no class weights)")
    if args.out and not args.class_weights:
        return "--out writes the class weights: give --class-weights too"
    if args.root and task == "multitask":
        return (f"--root: {args.config} is a multitask config with a root per source "
                "(data.segmentation.root, data.depth.root); set them in the config")
    return None


WEIGHTS_HEADER = "-frequency class weights from "  # in the first line of the fragment inspect writes


def check_weights_out(args: argparse.Namespace, files: list[str]) -> None:
    """``--out`` is not the config nor among the data (``files``), and replaces only inspect's own
    weights fragment unless ``--overwrite``."""
    from pathlib import Path

    from dptune.tools.inputs import check_output_file, config_inputs, refuse_among_inputs, small_text

    # the config and every file it names (its label file, ...) are inputs too
    refuse_among_inputs(args.out, files, "--out", singles=config_inputs(args.config, args.root))
    out = Path(args.out)
    if out.is_dir() or not out.resolve().parent.is_dir():
        raise ConfigError(f"--out {args.out}: give a file path in a folder that exists")
    check_output_file(args.out, "--out")
    if out.exists() and not args.overwrite:
        first = (small_text(out) or "").split("\n", 1)[0]
        if not (first.startswith("# ") and WEIGHTS_HEADER in first):
            raise ConfigError(f"--out {args.out}: already there and not a class-weights fragment inspect wrote; "
                              "give another path, or --overwrite to replace it")


def write_weights(args: argparse.Namespace, results: dict[str, SplitStats]) -> int:
    if "train" not in results:
        print("error: --class-weights needs a train split", file=sys.stderr)
        return 2
    train = results["train"]
    if not train.pixels[:len(train.present)].sum():  # nothing to weigh: NaN (inverse) or all 0 (median)
        print("error: --class-weights: the train split has no labelled pixel (every mask is ignore or unreadable); "
              "no weights written", file=sys.stderr)
        return 2
    w = class_weights(train, args.class_weights)
    print(f"class_weights ({args.class_weights}): {w}")
    absent = [name for name, n in zip(train.names, train.present, strict=True) if not n]
    if absent:  # its weight says nothing: the split never teaches it
        print(f"warning: {len(absent)} class(es) have no pixel in the train split, weight 0: {', '.join(absent[:8])}"
              f"{', ...' if len(absent) > 8 else ''}", file=sys.stderr)
    if args.out:
        from dptune.tools.outputs import write_text

        try:
            write_text(args.out, f"# {args.class_weights}{WEIGHTS_HEADER}{args.config} (train split)\n"
                       + yaml.safe_dump({"model": {"class_weights": w}}, default_flow_style=None))
        except OSError as e:  # a full disk: the weights were printed above
            print(f"error: --out {args.out}: could not be written ({e.strerror or e})", file=sys.stderr)
            return 2
    return 0


def read_config_mapping(path: str) -> dict:
    """A YAML config's mapping; a file that is not text (a picture) or not a mapping is one ``ConfigError``."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML config (not text: a picture or other binary file?)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not a config file (dptune inspect CONFIG.yaml)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not readable YAML ({' '.join(str(e).split())})") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: not a config (a YAML mapping with data:, model:, ...; found a "
                          f"{type(cfg).__name__})")
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("config", help="train.py YAML config (any task); its data: section is used")
    ap.add_argument("--root", help="override data.root (segmentation and depth configs)")
    ap.add_argument("--splits", help="comma-separated stages to inspect, of train, val and test (default: those the "
                                     "config has)")
    ap.add_argument("--class-weights", choices=["inverse", "median"],
                    help="segmentation configs: compute weights from the train split")
    ap.add_argument("--out", type=path_arg, help="with --class-weights: write the weights as a YAML config fragment "
                                  "(model.class_weights); not the config, not among the data")
    ap.add_argument("--overwrite", action="store_true",
                    help="let --out replace a file that is not inspect's own weights fragment")
    args = ap.parse_args(argv)
    try:
        cfg = read_config_mapping(args.config)
        task = str(cfg.get("task") or "segmentation")
        why = refusal(args, task)
        if why:
            print(f"error: {why}", file=sys.stderr)
            return 2
        data = dict(cfg.get("data") or {})
        if args.root:
            data["root"] = args.root
        stages = [s.strip() for s in (args.splits if args.splits is not None else ",".join(STAGES)).split(",")]
        if not all(stages) or set(stages) - set(STAGES):
            raise ConfigError(f"--splits {args.splits}: comma-separated stages, of {', '.join(STAGES)}")
        results, bad = inspect_config(task, data, stages,
                                      (lambda files: check_weights_out(args, files)) if args.out else None,
                                      model_depth_range(cfg, args.config) if task != "segmentation" else None,
                                      named=args.splits is not None)
    except (DataError, ConfigError, OSError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TypeError as e:  # a key the datamodule does not take
        print(f"error: {args.config}: data: {e}", file=sys.stderr)
        return 2
    if args.class_weights:
        rc = write_weights(args, results)
        if rc:
            return rc
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
