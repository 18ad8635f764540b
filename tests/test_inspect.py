import numpy as np
import yaml
from conftest import CAMVID, REPO, needs
from PIL import Image

from dptune.tools.inspect import class_weights, main

pytestmark = needs(CAMVID)


def test_camvid_pixel_frequencies_match_numpy(capsys, tmp_path):
    rc = main([str(REPO / "configs" / "camvid.yaml"), "--root", str(CAMVID), "--splits", "val",
               "--class-weights", "median", "--out", str(tmp_path / "w.yaml")])
    out = capsys.readouterr().out
    assert rc == 2  # --class-weights needs the train split: refused with a clear line
    rc = main([str(REPO / "configs" / "camvid.yaml"), "--root", str(CAMVID), "--splits", "val"])
    out = capsys.readouterr().out
    assert rc == 0
    counts = np.zeros(12, np.int64)
    for f in sorted((CAMVID / "valannot").glob("*.png")):
        counts += np.bincount(np.asarray(Image.open(f)).ravel(), minlength=12)[:12]
    names = yaml.safe_load((CAMVID / "labels.yaml").read_text())["names"]
    for i, name in enumerate(names):
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [name])
        assert int(line.split()[1]) == counts[i], name
        assert abs(float(line.split()[2]) - counts[i] / counts[:11].sum()) < 1e-4
    ignored = next(ln for ln in out.splitlines() if "ignored pixels" in ln)
    assert abs(float(ignored.split()[-1]) - counts[11] / counts.sum()) < 1e-4


def test_median_frequency_weights():
    from dptune.tools.inspect import SplitStats

    s = SplitStats("train", pixels=np.array([90, 10, 0, 5]), present=np.array([100, 50, 0]))
    w = class_weights(s, "median")  # freq 0.9, 0.2 -> median 0.55
    assert w[0] == round(0.55 / 0.9, 4) and w[1] == round(0.55 / 0.2, 4) and w[2] == 0.0
    inv = class_weights(s, "inverse")
    assert abs(np.mean([x for x in inv if x > 0]) - 1) < 1e-3
