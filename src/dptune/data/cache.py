"""On-disk cache of decoded samples (``data.cache: disk``): decode each image and encode each
mask once, then read raw arrays in every later epoch and run. Loading a raw array is several
times faster than decoding a JPEG/PNG, and unlike the in-memory cache it survives the run and
is shared by all processes and loader workers on a machine.

An entry is keyed by the image and mask paths, their sizes and modification times, and the
label set and the version of the decoder (``DECODER``), so an edited file or a changed ``labels.yaml`` misses the cache instead of serving
stale data, and an entry an earlier reader decoded differently (before EXIF orientation was
applied, say) is decoded anew. Entries are written to a temporary file and renamed (processes of a multi-GPU run
may write the same entry at once). The cache never writes next to the input data.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from dptune.errors import DataError
from dptune.labels import LabelSet

# bumped whenever decoding changes what a file reads as (2: EXIF orientation applied; 3: masks that are
# JPEG-coded, of 16-bit colour channels or with labels under transparency refused)
DECODER = 3


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dptune" / "samples"


def _stamp(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


class DiskCache:
    """``i in cache``, ``cache[i] -> (image, mask)`` and ``cache.put(i, image, mask)`` for the
    samples of a folder source (see the module docstring)."""

    def __init__(self, source, labels: LabelSet, directory: str | Path | None = None) -> None:
        if not hasattr(source, "masks") or not hasattr(source, "images"):
            raise DataError("data.cache: disk works with folder sources; use data.cache: memory for others")
        self.source = source
        self.dir = Path(directory) if directory else default_cache_dir()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.labels_key = hashlib.sha1(json.dumps(labels.to_dict(), sort_keys=True).encode()).hexdigest()
        self._keys: dict[int, str | None] = {}

    def _key(self, i: int) -> str | None:
        if i not in self._keys:
            try:
                stamp = f"{_stamp(self.source.images[i])}|{_stamp(self.source.masks[i])}|{self.labels_key}|decoder{DECODER}"
                self._keys[i] = hashlib.sha1(stamp.encode()).hexdigest()
            except OSError:  # a missing file: the checks report it; nothing to cache
                self._keys[i] = None
        return self._keys[i]

    def _paths(self, i: int) -> tuple[Path, Path] | None:
        key = self._key(i)
        if key is None:
            return None
        base = self.dir / key[:2] / key
        return base.with_suffix(".image.npy"), base.with_suffix(".mask.npy")

    def __contains__(self, i: int) -> bool:
        paths = self._paths(i)
        return paths is not None and paths[0].exists() and paths[1].exists()

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self._paths(i)
        # the image memory-mapped (a training crop reads only the pages it covers; every consumer
        # copies it), the small mask read whole (it may reach torch untouched, which wants it writable)
        return np.load(image_path, mmap_mode="r"), np.load(mask_path)

    def put(self, i: int, image: np.ndarray, mask: np.ndarray) -> None:
        paths = self._paths(i)
        if paths is None:
            return
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for path, array in zip(paths, (image, mask), strict=True):
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(array))
            os.replace(tmp, path)
