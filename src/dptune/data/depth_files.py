"""Reading a depth file as float32 metres, 0 = no measurement: 16-bit PNG / TIFF with a scale,
.npy, float TIFF; the scale a ``depth_format.json`` beside the files gives; camera intrinsics.
Refused in one line naming the file: 8-bit images, negative values, other shapes and types."""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from dptune.data.images import image_header_size, opencv_problem, read_bytes
from dptune.errors import ConfigError, DataError

log = logging.getLogger(__name__)


NegativeDepth = Literal["error", "invalid"]


def read_depth(path: str, scale: float | None = None, negative: NegativeDepth = "error") -> np.ndarray:
    """A depth file as float32 metres, 0 where there is no measurement: stored values divided by
    ``scale`` (NYU and 7-Scenes 16-bit PNGs: millimetres, 1000; KITTI: 256; metres: 1); ``None``
    (default): what a ``depth_format.json`` beside the file says, else by the file's type (see
    ``effective_scale``). NaN and infinite values become 0 (invalid); negative values are an error
    naming the file (``check_negative``) unless ``negative`` is ``invalid``."""
    raw = read_raw_depth(path, scale)
    check_negative(path, raw, negative)
    return to_metres(raw, effective_scale(path, raw, scale))


def check_negative(name: str, raw: np.ndarray, negative: NegativeDepth = "error") -> None:
    """Depth is a distance: a negative stored value is not a measurement. Some formats mark missing
    depth with -1; ``negative: invalid`` reads such values as "no measurement" (0). Otherwise the
    file is bad, named with how many values are negative."""
    if raw.dtype.kind == "u" or negative == "invalid":
        return
    below = raw < 0
    if raw.dtype.kind == "f":
        below &= np.isfinite(raw)  # -inf is no value, as NaN and +inf are: read as no measurement (to_metres)
    n = int(np.count_nonzero(below))
    if n:
        raise DataError(f"{name}: {n} negative depth value(s) (lowest {float(raw[below].min()):g}); depth is a "
                        "distance (if this format marks missing depth with negative values, set data.negative_depth: "
                        "invalid, or dptune evaluate --negative-depth invalid, to read them as no measurement)")


def read_intrinsics(spec: str) -> tuple[float, float, float, float]:
    """Pinhole camera intrinsics ``(fx, fy, cx, cy)`` from ``fx,fy,cx,cy`` or a file holding a 3x3
    camera matrix (e.g. 7-Scenes' camera-intrinsics.txt). Every value must be finite and the focal
    lengths positive: a NaN would turn every back-projected point into NaN without a word."""
    is_file = Path(spec).is_file()
    name = spec if is_file else f"--intrinsics {spec!r}"
    try:
        if is_file:
            with warnings.catch_warnings():  # numpy's 'input contained no data' warning: said below in one line
                warnings.simplefilter("ignore", UserWarning)
                k = np.loadtxt(spec)
            if k.size != 9:
                raise ValueError(f"{k.size} values, not a 3x3 matrix")
            k = k.reshape(3, 3)
            if not np.allclose(k[2], (0, 0, 1)) or k[1, 0] != 0 or k[0, 1] != 0:  # k[0, 1]: a skew, not modelled
                rows = "; ".join(" ".join(f"{v:g}" for v in row) for row in k)
                raise ValueError(f"[{rows}] is not a pinhole camera matrix [fx 0 cx; 0 fy cy; 0 0 1]"
                                 + (" (transposed?)" if np.allclose(k[:, 2], (0, 0, 1)) else ""))
            values = [float(k[0, 0]), float(k[1, 1]), float(k[0, 2]), float(k[1, 2])]
        elif "," not in spec and (os.sep in spec or Path(spec).suffix[1:].isalpha()):
            raise ValueError("no such file")
        else:
            values = [float(v) for v in spec.split(",")]
    except ValueError as e:
        raise DataError(f"{name}: not fx,fy,cx,cy nor a 3x3 camera matrix file ({e})") from None
    if len(values) != 4:
        raise DataError(f"{name}: give fx,fy,cx,cy or a 3x3 matrix file")
    if not all(math.isfinite(v) for v in values):
        raise DataError(f"{name}: camera intrinsics fx, fy, cx, cy = {values} are not finite")
    if values[0] < 1 or values[1] < 1:  # 1e-40 put points at infinity; 0.5 is a normalised matrix (x image size)
        raise DataError(f"{name}: focal length fx, fy = {values[0]:g}, {values[1]:g}: in pixels, at least 1 (a "
                        "matrix normalised by the image size is multiplied by its width and height first)")
    return values[0], values[1], values[2], values[3]


def read_raw_depth(path: str, scale: float | None = None) -> np.ndarray:
    """A depth file's stored values (one channel of numbers), as they are in the file."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        try:
            raw = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise DataError(f"{path}: depth file not found") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable .npy depth map ({e})") from None
    else:
        data = read_bytes(path)
        if not data:  # OpenCV's decoder stops on an empty buffer with an assertion, not None
            raise DataError(f"{path}: empty file (0 bytes), not a depth map")
        try:
            raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
        except cv2.error as e:
            raise DataError(f"{path}: not a readable depth map ({opencv_problem(e)})") from None
        if raw is None:
            raise DataError(f"{path}: not a readable depth map (truncated or not an image)")
        if raw.dtype == np.uint8:  # PNG, TIFF or JPEG alike (JPEG is lossy on top)
            raise DataError(f"{path}: 8-bit image where a 16-bit or float depth map is expected (depth in "
                            f"1/{scale or 1000:g} m needs 16 bits; an 8-bit file is usually a visualisation, not "
                            "the measurement)")
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[..., 0]
    if raw.ndim != 2:
        raise DataError(f"{path}: depth must have one channel, got shape {tuple(raw.shape)}")
    if raw.dtype.kind not in "uif":
        raise DataError(f"{path}: unsupported depth type {raw.dtype}")
    return raw


@functools.lru_cache(maxsize=64)
def sidecar_scale(folder: str, lenient: bool = False) -> float | None:
    """The stored value per metre that a ``depth_format.json`` in ``folder`` gives (dptune's predict
    writes one beside its maps: millimetres, 256 per metre or float metres), else None: no such file,
    or one without a ``metric`` field (not a depth format: a user's own notes by that name). A file
    that says ``metric: false`` holds relative inverse depth, which no reading turns into distances:
    one line naming it. So is one that is broken (bad JSON, no usable ``value_per_metre``), unless
    ``lenient`` (a depth_scale was given, and is used whatever the file says). A ``ConfigError``, not
    a ``DataError``: it is the folder's, not one sample's (said once, never skipped sample by sample)."""
    import json

    path = Path(folder, "depth_format.json")
    way_out = "; remove or rename it, or give data.depth_scale (evaluate: --depth-scale)"
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        if lenient:
            return None
        raise ConfigError(f"{path}: not readable JSON ({e}); it would say how the depth maps beside it are "
                        f"stored{way_out}") from None
    if not isinstance(spec, dict) or "metric" not in spec:
        return None
    if spec["metric"] is False:
        raise ConfigError(f"{path}: the maps beside it are relative inverse depth (metric: false), not distances; "
                        "they cannot be read as depth")
    per_metre = spec.get("value_per_metre")
    if spec["metric"] is not True or isinstance(per_metre, bool) or not isinstance(per_metre, (int, float)) \
            or not 0 < per_metre < math.inf:
        if lenient:
            return None
        raise ConfigError(f"{path}: expected metric: true and value_per_metre a positive number, got metric "
                        f"{spec['metric']!r}, value_per_metre {per_metre!r}{way_out}")
    return float(per_metre)


_DISAGREED: set[str] = set()  # folders already warned about


def effective_scale(path: str, raw: np.ndarray, scale: float | None) -> float:
    """The stored value per metre of a depth file: ``scale`` when given (said once per folder when a
    ``depth_format.json`` beside it says otherwise), else what that file says, else by the data's
    type (``default_scale``), which 8-bit integers have none of: one line naming the file."""
    folder = os.path.dirname(os.path.abspath(path))
    beside = sidecar_scale(folder, lenient=scale is not None)
    if scale is not None:
        if beside is not None and beside != scale and folder not in _DISAGREED:
            _DISAGREED.add(folder)
            log.warning("%s: depth_scale %g is used, while its depth_format.json says %g per metre", folder, scale,
                        beside)
        return scale
    if beside is not None:
        return beside
    check_not_8bit(path, raw)  # (8-bit images are refused when read)
    return default_scale(raw)


def check_not_8bit(name: str, raw: np.ndarray) -> None:
    """Depth with no unit given must not be 8-bit integers: read as integers are (millimetres) it
    would end at 0.255 m."""
    if raw.dtype.kind in "ui" and raw.dtype.itemsize == 1:
        raise DataError(f"{name}: 8-bit integers ({raw.dtype}) where 16-bit integers (millimetres) or floats "
                        "(metres) are expected; 8-bit depth is usually a visualisation, not the measurement (if "
                        "these values are depth in another unit, give data.depth_scale: stored values per metre)")


def default_scale(raw: np.ndarray) -> float:
    """The stored value per metre when none is given: 1 for floating-point data (.npy, float TIFF,
    float columns: metres), 1000 for integers (16-bit PNG and TIFF: millimetres, as NYU and 7-Scenes)."""
    return 1.0 if raw.dtype.kind == "f" else 1000.0


def to_metres(raw: np.ndarray, scale: float | None) -> np.ndarray:
    """Stored depth values / ``scale`` (``None``: by type, see ``default_scale``) as float32 metres;
    NaN, infinite and negative become 0 (invalid), and so does 16-bit data's largest value, 65535
    (Kinect data such as 7-Scenes mark "no reading" with it; a saturated value is not a distance;
    other integer types keep every value). Readers refuse negative values before this
    (``check_negative``) unless told to read them as invalid."""
    depth = raw.astype(np.float32) / np.float32(default_scale(raw) if scale is None else scale)
    invalid = ~np.isfinite(depth) | (depth < 0)
    if raw.dtype == np.uint16:
        invalid |= raw == 65535
    depth[invalid] = 0.0
    return depth


def check_depth_size(name: str, image_hw: tuple[int, int], depth: np.ndarray) -> None:
    if tuple(image_hw) != depth.shape[:2]:
        raise DataError(f"{name}: depth map is {depth.shape[1]}x{depth.shape[0]} but its image is "
                        f"{image_hw[1]}x{image_hw[0]}")


def depth_header_size(path: str) -> tuple[int, int]:
    """(h, w) of a depth file without decoding it where the format allows (PNG/TIFF headers)."""
    if path.lower().endswith(".npy"):
        return read_depth(path).shape[:2]
    return image_header_size(path)
