"""What a split's depth values say about their unit and the model's range: the unit check
(``check_split_depth``: a wrong ``depth_scale`` gives medians far outside plausible metres) and the
range check (``check_depth_range``: maps outside the model's [min_depth, max_depth] count nowhere).
Run by fit's pre-flight check and by ``evaluate``."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np

from dptune.errors import DataError

log = logging.getLogger(__name__)


PLAUSIBLE_DEPTH = (0.05, 1000.0)  # metres: what real scenes' median measured depth lies within


def check_split_depth(where: str, medians: dict[int, float], source,
                      name: Callable[[int], str]) -> tuple[float, dict[int, str]]:
    """The unit check of a split's maps (``medians``: each map's median valid depth), in fit's
    pre-flight check and in ``evaluate`` alike: ``check_depth_values`` on the maps read at each stored
    value per metre on their own (``source.used_scales``: folders' depth_format.json files may
    differ, and a wrong one must not hide among the rest's metres), then each map's own
    (``odd_unit``, with the scale it was read at). Returns the scale most maps were read at and the
    problem of each map in another unit than the rest."""
    scale_of = {i: source.used_scales.get(i, source.scale or 1000.0) for i in medians}
    groups: dict[float, list[int]] = {}
    for i, scale in scale_of.items():
        groups.setdefault(scale, []).append(i)
    ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    if not ordered:
        check_depth_values(where, [], source.scale or 1000.0)  # no valid pixel anywhere: says so
    for scale, members in ordered:
        part = where if len(ordered) == 1 else (f"{where}: the {len(members)} maps read as stored value / {scale:g} "
                                                f"per metre (first: {name(members[0])})")
        check_depth_values(part, [medians[i] for i in members], scale)
    odd = {i: problem for i in medians if (problem := odd_unit(name(i), medians[i], scale_of[i]))}
    return ordered[0][0], odd


def check_depth_values(where: str, medians: list[float], scale: float) -> None:
    """Stop when a split's depth cannot be metres: no valid pixel in any map, or a median valid depth
    (over maps) far outside ``PLAUSIBLE_DEPTH``, which is what a wrong ``depth_scale`` gives (metres
    read as millimetres: 0.0025 m; millimetres read as metres: 2500 m). ``scale`` is the stored
    value per metre that was used; the likely right one is named."""
    if not medians:
        raise DataError(f"{where}: no depth map has a valid (> 0) pixel; nothing to train or score on")
    median = float(np.median(medians))
    lo, hi = PLAUSIBLE_DEPTH
    if lo <= median <= hi:
        return
    fixes = [s for s in (1.0, 256.0, 1000.0) if s != scale and lo <= median * scale / s <= hi]
    best = min(fixes, key=lambda s: abs(np.log(median * scale / s / 3.0))) if fixes else None
    hint = f"; with data.depth_scale {best:g} the median would be {median * scale / best:.3g} m" if best else ""
    raise DataError(f"{where}: median valid depth {median:.4g} m (stored values / {scale:g} per metre) is not "
                    f"plausible for metres (expected {lo:g}-{hi:g} m){hint}")


def odd_unit(name: str, median: float, scale: float) -> str | None:
    """One map's problem when its median valid depth is not plausible metres while its split's is (a
    map in another unit among the rest: a bad sample), else None; ``scale``: stored values per metre."""
    lo, hi = PLAUSIBLE_DEPTH
    if lo <= median <= hi:
        return None
    return (f"{name}: median valid depth {median:.4g} m is not plausible metres (stored value / {scale:g}); is this "
            "map in another unit than the rest of the split?")


def check_depth_range(where: str, stats: list[tuple[str, float, float, float]], min_depth: float,
                      max_depth: float | None) -> None:
    """The model's valid range against a split's depth (each map's name and 1%, 50%, 99% valid
    depth): when no map has depth inside [min_depth, max_depth] the run would train (or score) on
    nothing, so it stops; maps wholly outside the range are named in a warning."""
    if not stats:
        return
    hi = max_depth if max_depth else math.inf
    outside = [s for s in stats if s[3] < min_depth or s[1] > hi]
    if len(outside) == len(stats):
        raise DataError(f"{where}: no depth map has valid depth inside the model's range [{min_depth:g}, "
                        f"{hi:g}] m (median {float(np.median([s[2] for s in stats])):.3g} m); check data.depth_scale "
                        "and model.min_depth / model.max_depth")
    if outside:
        log.warning("%s: %d of %d depth maps lie wholly outside the model's range [%g, %g] m and count in no loss or "
                    "metric (first: %s)", where, len(outside), len(stats), min_depth, hi, outside[0][0])
    mostly = [s for s in stats if not min_depth <= s[2] <= hi]
    if len(mostly) * 2 > len(stats):
        median = float(np.median([s[2] for s in stats]))
        log.warning("%s: %d of %d depth maps have most of their valid depth outside the model's range [%g, %g] m "
                    "(median %.3g m): those pixels count in no loss or metric; check model.min_depth / "
                    "model.max_depth and data.depth_scale", where, len(mostly), len(stats), min_depth, hi, median)
