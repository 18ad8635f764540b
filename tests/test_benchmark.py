"""scripts/benchmark.py --profile: where a training step's time goes, from the step itself."""

from __future__ import annotations

import json

from dptune.tools.benchmark import main


def test_profile_names_the_operators_that_take_the_step(tiny_config_path, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--model", str(tiny_config_path), "--crop", "64", "--batch", "2", "--steps", "2", "--warmup", "1",
                 "--precision", "32-true", "--profile", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["dptune"]["profile"]
    shares = [r["share"] for r in rows]
    assert rows and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    # a DPT's training step runs convolutions forward and backward: both are among its operators
    ops = {r["op"] for r in rows}
    assert {"aten::convolution_backward", "aten::mkldnn_convolution"} & ops, ops
    assert all(r["ms_per_step"] > 0 and r["calls_per_step"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert rows[0]["op"] in printed and "ms/step" in printed


def test_a_negative_profile_is_refused_in_one_line(capsys):
    assert main(["--profile", "-1"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: --profile -1"), err
