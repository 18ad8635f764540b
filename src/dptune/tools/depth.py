"""The depth side of ``scripts/predict.py``; ``scripts/evaluate.py``'s is ``dptune.tools.depth_evaluate``.

predict: ``<stem>_depth.png`` (16-bit: for metric models millimetres, i.e. value / 1000 = metres,
or KITTI's value / 256 = metres when the model's range passes 65.535 m; relative models: the
prediction scaled to 0-65535 per image; ``depth_format.json`` says which), ``<stem>_depth_color.png`` (turbo,
near = warm) and, with ``--intrinsics fx,fy,cx,cy`` (or a 3x3 matrix file), ``<stem>.ply``: a
coloured point cloud in metres (metric models only). Depth is predicted on the whole image at one
scale: a window or a zoom shows the scene at another focal length, so its metric depth would be
wrong (``--mode slide`` and ``--scales`` are refused; of a segmentation + depth model they apply
to the masks). ``--flip`` (any setting) averages the prediction with that of the left-right
mirror, the one flip depth trains with; up-down flips and turns show scenes a depth model has
not seen.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from dptune.data.depth_files import read_intrinsics
from dptune.errors import ConfigError, DataError
from dptune.tasks.visuals import colorize_depth, depth_range
from dptune.tools.inputs import parse_scales, small_text
from dptune.tools.outputs import imwrite, write_replacing, write_text
from dptune.tools.predict_run import failures, predict_each, prepare_out


def intrinsics(spec: str) -> tuple[float, float, float, float]:
    """``fx,fy,cx,cy`` or a file holding a 3x3 camera matrix (e.g. 7-Scenes' camera-intrinsics.txt);
    non-finite values and focal lengths <= 0 are refused."""
    return read_intrinsics(spec)


def cloud_intrinsics(spec: str | None, metric: bool) -> tuple[float, float, float, float] | None:
    """The camera for point clouds, or None: none asked for, or a relative model (no metres)."""
    if spec is None:
        return None
    k = intrinsics(spec)
    if not metric:
        print("warning: a relative model's output has no metres; no point clouds written", file=sys.stderr)
        return None
    return k


def refuse_segmentation_options(args) -> None:
    """A depth model predicts the whole image at one scale and has no class probabilities: the options
    that only a segmentation model honours stop here, in one line."""

    why = "a depth model predicts the whole image at one scale (a window or a zoom would change its metric depth)"
    if args.mode != "whole":
        raise ConfigError(f"--mode {args.mode}: {why}; sliding windows are for segmentation models")
    if parse_scales(args.scales) != (1.0,):
        raise ConfigError(f"--scales {args.scales}: {why}; multi-scale views are for segmentation models")
    if getattr(args, "confidence", False):
        raise ConfigError("--confidence: a depth model has no class probabilities; it is for segmentation models")


def mirror_note(flip: str) -> str:
    """What ``--flip`` does to depth, for the log."""
    if flip == "none":
        return ""
    rest = f" (the up-down flips and turns of --flip {flip} are not: depth never trains on them)" if flip != "h" else ""
    return f"depth averaged with its left-right mirror{rest}"


def mirror_mean(predictor, image: np.ndarray, flip: str = "none") -> np.ndarray:
    """The model's depth of one uint8 HxWx3 image at its size; with any ``flip`` but ``none`` the
    mean of the image's prediction and its left-right mirror's (see ``mirror_note``)."""
    depth = predictor.predict(image)
    if flip != "none":
        # halves summed: two finite maps near the float32 limit would sum to inf
        depth = depth / 2 + predictor.predict(np.ascontiguousarray(image[:, ::-1]))[:, ::-1] / 2
    return depth


def depth_views(predictor, image: np.ndarray, flip: str = "none") -> np.ndarray:
    """``mirror_mean`` clipped at 0: the depth predict writes."""
    return np.clip(mirror_mean(predictor, image, flip), 0, None)


def depth_encoding(predictor) -> dict:
    """How predicted maps are stored (what ``depth_format.json`` says): a metric model's as 16-bit
    millimetres when its max_depth fits (up to 65.534 m), else KITTI's 256 per metre (up to 255.99 m
    at 3.9 mm steps), else (a larger or no bound) float32 TIFF in metres; a relative model's as 16-bit
    scaled to 0-65535 per image."""
    if predictor.mode != "metric":
        return {"file": "<stem>_depth.png", "dtype": "uint16", "metric": False,
                "meaning": "relative inverse depth (larger = nearer), scaled to 0-65535 per image"}
    max_depth = float(predictor.meta.get("max_depth") or "inf")
    for per_metre in (1000.0, 256.0):
        # 65535, the top of the range, is kept for depth beyond it (clipped, said when written): dptune's
        # reader, like Kinect data's, takes it as no measurement
        if max_depth <= 65534 / per_metre:
            return {"file": "<stem>_depth.png", "dtype": "uint16", "metric": True, "value_per_metre": per_metre,
                    "max_metres": round(65534 / per_metre, 3), "invalid": [0, 65535]}
    return {"file": "<stem>_depth.tiff", "dtype": "float32", "metric": True, "value_per_metre": 1.0, "invalid": 0}


def encoding_words(enc: dict) -> str:
    if not enc["metric"]:
        return "relative inverse depth scaled to 0-65535 per image"
    if enc["dtype"] == "float32":
        return "float32 metres"
    return f"value / {enc['value_per_metre']:g} = metres, up to {enc['max_metres']:.3f} m"


def depth_files(stem: str, enc: dict, k: tuple[float, float, float, float] | None) -> list[str]:
    """What ``write_depth`` writes for one input."""
    return [enc["file"].replace("<stem>", stem), f"{stem}_depth_color.png"] + ([f"{stem}.ply"] if k and enc["metric"]
                                                                               else [])


def write_depth(out: Path, stem: str, depth: np.ndarray, image: np.ndarray, enc: dict,
                k: tuple[float, float, float, float] | None) -> bool:
    """The map as ``enc`` says (``depth_encoding``), ``<stem>_depth_color.png`` and, with ``k`` (metric
    models), ``<stem>.ply``; returns whether the map had depth beyond what a 16-bit PNG holds
    (clipped there)."""
    metric, clipped = enc["metric"], False
    if enc["dtype"] == "float32":
        stored = depth.astype(np.float32)
    elif metric:
        scaled = np.round(depth.astype(np.float64) * enc["value_per_metre"])
        clipped = bool((scaled > 65534).any())  # 65535 is the no-depth code: what lands there is beyond the range
        # 0 is the no-depth code too: depth above 0 but under half a step is stored as one step (the .ply keeps it)
        scaled[(scaled == 0) & (depth > 0)] = 1
        stored = np.clip(scaled, 0, 65535).astype(np.uint16)
    else:
        stored = np.round(65535 * (depth - depth.min()) / max(float(np.ptp(depth)), 1e-12)).astype(np.uint16)
    imwrite(out / enc["file"].replace("<stem>", stem), stored)
    shown = depth if metric else 1.0 / np.clip(depth, 1e-6, None)  # relative: inverse depth, near = large
    lo, hi = depth_range(shown)
    units = "m" if metric else ""  # the bar of a relative map: 1 / its inverse depth, no unit
    imwrite(out / f"{stem}_depth_color.png", colorize_depth(shown, lo, hi, units=units)[..., ::-1])
    if k is not None and metric:
        write_ply(out / f"{stem}.ply", depth, image, k)
    return clipped


def write_depth_format(out: Path, enc: dict) -> str:
    """``depth_format.json`` beside the maps (how to read them; dptune's depth reader follows it),
    written before any map: one already there that says otherwise (another model's maps, or not
    dptune's file) stops the run instead of being overwritten. Returns the encoding in words."""

    check_depth_format(out, enc)
    write_text(out / "depth_format.json", json.dumps(enc, indent=2) + "\n")
    return encoding_words(enc)


def check_depth_format(out: str | Path, enc: dict) -> None:
    """A ``depth_format.json`` already in ``out`` must say ``enc``: called before anything is written
    there too (predict's list of its files was written before this refusal)."""

    path = Path(out) / "depth_format.json"
    if path.exists():
        try:
            there = json.loads(small_text(path) or "")
        except ValueError:
            there = None
        if there != enc:
            raise DataError(f"{path}: already there and describes other depth maps ({there}); predict into "
                            "another folder (or remove it) so that it stays true for every map beside it")


def write_ply(path: Path, depth: np.ndarray, image: np.ndarray, k: tuple[float, float, float, float]) -> int:
    """Back-project every pixel with depth > 0 (pinhole model) into a binary little-endian PLY with colours."""
    fx, fy, cx, cy = k
    v, u = np.nonzero(depth > 0)
    z = depth[v, u].astype(np.float32)
    xyz = np.stack([(u - cx) * z / fx, (v - cy) * z / fy, z], 1).astype(np.float32)
    rgb = image[v, u].astype(np.uint8)
    vertex = np.empty(len(z), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"),
                                     ("blue", "u1")])
    vertex["x"], vertex["y"], vertex["z"] = xyz.T
    vertex["red"], vertex["green"], vertex["blue"] = rgb.T
    header = ("ply\nformat binary_little_endian 1.0\n"
              f"element vertex {len(z)}\nproperty float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
    write_replacing(path, lambda tmp: Path(tmp).write_bytes(header.encode() + vertex.tobytes()))
    return len(z)


def predict_depth(args, paths: list[str], stems: list[str]) -> int:
    """Depth maps of ``paths`` into ``args.out`` (outputs named by ``stems``, see ``output_stems``)."""
    from dptune.inference.depth_predictor import DepthPredictor

    refuse_segmentation_options(args)
    predictor = DepthPredictor.load(args.model, args.device, trust_remote_code=args.trust_remote_code,
                                    backend=getattr(args, "backend", "torch"))
    metric = predictor.mode == "metric"
    k = cloud_intrinsics(args.intrinsics, metric)
    if mirror_note(args.flip):
        print(f"note: {mirror_note(args.flip)}", file=sys.stderr)
    enc = depth_encoding(predictor)
    writes = DepthWrites(args.out, [f for s in stems for f in depth_files(s, enc, k)], args.overwrite, enc, k)

    def one(path: str, stem: str, image: np.ndarray) -> None:
        writes.write(path, stem, depth_views(predictor, image, args.flip), image)

    failed = predict_each(paths, stems, "predicting depth", one)
    done = len(paths) - len(failed)
    print(f"{done} depth map{'' if done == 1 else 's'} in {writes.out}: {enc['file']} ({writes.words}; "
          "depth_format.json)")
    writes.warn()
    return failures(failed, len(paths))


def off_camera(k: tuple[float, float, float, float] | None, shape: tuple[int, ...]) -> bool:
    """The principal point (cx, cy) of ``k`` lies outside an image of ``shape`` (h, w, as read:
    upright): intrinsics of another image size, whose point cloud comes out skewed."""
    if k is None:
        return False
    h, w = shape[:2]
    return not (0 <= k[2] <= w and 0 <= k[3] <= h)


class DepthWrites:
    """The depth outputs of a predict run (depth and joint models alike): ``--out`` prepared (a
    ``depth_format.json`` there checked before anything is written, then predict's list of files,
    then the format file), each map written (``write``), and what the run says at its end (``warn``):
    maps clipped at the top of a 16-bit PNG, maps with no depth anywhere (all no-depth, a point cloud
    with no point), images that do not hold the --intrinsics' principal point (skewed clouds)."""

    def __init__(self, out: str, planned: list[str], overwrite: bool, enc: dict,
                 k: tuple[float, float, float, float] | None) -> None:
        check_depth_format(out, enc)  # before prepare_out writes anything there
        self.out = prepare_out(out, planned, overwrite)
        self.words = write_depth_format(self.out, enc)
        self.enc, self.k = enc, k
        self.clipped: list[str] = []
        self.empty: list[str] = []
        self.off: list[str] = []

    def write(self, path: str, stem: str, depth: np.ndarray, image: np.ndarray) -> None:
        if not (depth > 0).any():
            self.empty.append(path)
        if off_camera(self.k, depth.shape):
            self.off.append(path)
        if write_depth(self.out, stem, depth, image, self.enc, self.k):
            self.clipped.append(path)

    def warn(self) -> None:
        enc, clipped, empty, off = self.enc, self.clipped, self.empty, self.off
        if clipped:
            print(f"warning: {len(clipped)} depth map(s) reach beyond {enc['max_metres']:.3f} m, what a 16-bit PNG "
                  f"at {enc['value_per_metre']:g} per metre holds; clipped there (first: {clipped[0]})",
                  file=sys.stderr)
        if empty:
            print(f"warning: {len(empty)} depth map(s) have no depth above 0 anywhere: all no-depth, and no point "
                  f"in a point cloud (first: {empty[0]})", file=sys.stderr)
        if off:
            print(f"warning: {len(off)} image(s) do not hold the --intrinsics' principal point (cx, cy) as read "
                  f"upright: the camera is another image size's, and their point clouds are skewed (first: "
                  f"{off[0]})", file=sys.stderr)
