"""scripts/benchmark.py --profile: where a training step's time goes, from the step itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dptune.tools.benchmark import main


def test_profile_names_the_operators_that_take_the_step(tiny_config_path, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--model", str(tiny_config_path), "--crop", "64", "--batch", "2", "--steps", "2", "--warmup", "1",
                 "--precision", "32-true", "--profile", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["dptune"]
    rows = result["profile"]
    assert result["profiled_steps"] == 2 and not any(r["op"].startswith("Optimizer.") for r in rows)
    total = [r for r in rows if r["shapes"] == "all"]
    by_shape = [r for r in rows if r["shapes"] != "all"]
    for part in (total, by_shape):
        shares = [r["share"] for r in part]
        assert part and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    # a DPT's training step runs convolutions backward; in all, the operator takes at least what any of its shapes does
    backward = [r for r in rows if r["op"] == "aten::convolution_backward"]
    assert backward and backward[0]["shapes"] == "all" and all(r["share"] <= backward[0]["share"] for r in backward)
    assert all(r["ms_per_step"] > 0 and r["calls_per_step"] > 0 for r in rows)
    # the forward pass split by the network's parts: the encoder, the neck (reassemble + fusion), the head
    parts = {r["part"]: r for r in result["profile_parts"]}
    within = ["embeddings", "encoder layers", "neck (reassemble + fusion)", "head"]
    assert set(within) | {"network", "loss"} <= set(parts), parts
    assert all(0 < r["share"] < 1 and r["ms_per_step"] > 0 for r in parts.values())
    assert sum(parts[p]["ms_per_step"] for p in within) <= parts["network"]["ms_per_step"] * 1.001
    assert not any(r["op"].startswith("dptune.") for r in rows)
    printed = capsys.readouterr().out
    assert rows[0]["op"] in printed and "ms/step" in printed and "within encoder layers" in printed


def test_a_negative_profile_is_refused_in_one_line(capsys):
    assert main(["--profile", "-1"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: --profile -1"), err


def test_options_that_cannot_work_are_refused_in_one_line_before_anything_runs(capsys, monkeypatch):
    import dptune.tools.benchmark as bench

    monkeypatch.setattr(bench, "run_job", lambda *a, **k: pytest.fail("a job ran"))
    for args, named in ((["--profile", "2", "--joint"], "--joint"), (["--profile", "2", "--data", "x.yaml"], "--data"),
                        (["--warmup", "0"], "at least 1"), (["--steps", "0"], "at least 1"),
                        (["--json", "/nonexistent-folder/bench.json"], "/nonexistent-folder"),
                        (["--rounds", "0", "--baseline"], "at least 1"), (["--rounds", "4"], "--baseline"),
                        (["--rounds", "3", "--baseline"], "even number"),
                        (["--baseline", "--joint"], "--joint"), (["--baseline", "--data", "x.yaml"], "--data"),
                        # a zero batch or crop was a reshape / resize RuntimeError from the timed job, zero samples a
                        # ZeroDivisionError traceback, a negative peak a negative MFU
                        (["--batch", "0"], "at least 1"), (["--crop", "0"], "at least 1"),
                        (["--num-labels", "0"], "at least 1"), (["--samples", "0", "--data", "x.yaml"], "at least 1"),
                        (["--peak-tflops", "-1"], "above 0"), (["--peak-tflops", "nan"], "above 0"),
                        # -1 ran unclipped without a word, nan ended in a misleading Lightning exception
                        (["--gradient-clip-val", "-1"], "above 0"), (["--gradient-clip-val", "nan"], "above 0")):
        assert main(args) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith(f"error: {args[0]}") and named in err[0], err


def _fake_jobs(monkeypatch, speeds: dict[str, list], ran: list[str]):
    """run_job standing in for the timed processes: each job's images/s (or an error) in turn."""
    import dptune.tools.benchmark as bench

    left = {k: iter(v) for k, v in speeds.items()}

    def fake(job, opts):
        name = "dptune" if job is bench.time_dptune else "hf_trainer"
        ran.append(name)
        assert opts["profile"] == (2 if name == "dptune" and len(ran) <= 2 else 0)  # profiled once, in round 1
        value = next(left[name])
        if isinstance(value, str):
            return {"error": value}
        r = {"images_per_s": value, "peak_mem_gib": 1.0 + len(ran) / 10}
        return dict(r, profile=[]) if opts["profile"] else r

    monkeypatch.setattr(bench, "run_job", fake)


def test_rounds_alternate_the_recipes_and_give_the_geometric_mean_ratio(tiny_config_path, tmp_path, capsys,
                                                                          monkeypatch):
    """A shared machine drifts: each round runs both recipes back to back, who goes first alternates
    (each order equally often), and the ratio is the geometric mean of the rounds' ratios. Every
    figure in the JSON is over the rounds, not the first round's."""
    ran: list[str] = []
    _fake_jobs(monkeypatch, {"dptune": [9.0, 6.0, 8.0, 6.0], "hf_trainer": [6.0, 6.0, 5.0, 5.0]}, ran)
    out = tmp_path / "bench.json"
    assert main(["--model", str(tiny_config_path), "--crop", "64", "--batch", "2", "--precision", "32-true",
                 "--baseline", "--rounds", "4", "--profile", "2", "--json", str(out)]) == 0
    assert ran == ["dptune", "hf_trainer", "hf_trainer", "dptune"] * 2
    result = json.loads(out.read_text())
    ratios = [1.5, 1.0, 1.6, 1.2]
    assert [r["ratio_vs_hf_trainer"] for r in result["rounds"]] == pytest.approx(ratios)
    assert [r["first"] for r in result["rounds"]] == ["dptune", "hf_trainer"] * 2
    assert result["ratio_vs_hf_trainer"] == pytest.approx(float(np.prod(ratios)) ** 0.25)
    assert result["dptune"]["images_per_s"] == pytest.approx((9 * 6 * 8 * 6) ** 0.25)
    assert result["dptune"]["images_per_s_rounds"] == [9.0, 6.0, 8.0, 6.0]
    assert result["hf_trainer"]["peak_mem_gib"] == pytest.approx(1.7)  # the largest of its rounds
    assert "profile" in result["dptune"] and "error" not in result
    printed = capsys.readouterr().out
    assert f"dptune / HF Trainer: {result['ratio_vs_hf_trainer']:.2f}x (geometric mean of 4 rounds" in printed
    assert "1.50x, 1.00x, 1.60x, 1.20x" in printed


def test_a_round_that_fails_is_in_the_json_and_the_exit_code(tiny_config_path, tmp_path, capsys, monkeypatch):
    ran: list[str] = []
    _fake_jobs(monkeypatch, {"dptune": [9.0, 6.0], "hf_trainer": [6.0, "out of memory"]}, ran)
    out = tmp_path / "bench.json"
    assert main(["--model", str(tiny_config_path), "--crop", "64", "--batch", "2", "--precision", "32-true",
                 "--baseline", "--rounds", "4", "--profile", "2", "--json", str(out)]) == 1
    assert ran == ["dptune", "hf_trainer", "hf_trainer", "dptune"]  # no round after the failed one
    result = json.loads(out.read_text())
    assert result["error"] == "round 2: hf_trainer: out of memory"
    assert len(result["rounds"]) == 2 and "ratio_vs_hf_trainer" not in result
    assert result["hf_trainer"] == {"error": "out of memory"}
    assert "hf_trainer  failed: out of memory  (round 2 of 4)" in capsys.readouterr().out


def test_the_hf_trainer_baseline_runs_and_gives_a_ratio(tiny_config_path, tmp_path, capsys):
    """The plain Trainer recipe the ratio is taken against, for real (a tiny DPT, two timed steps)."""
    out = tmp_path / "bench.json"
    assert main(["--model", str(tiny_config_path), "--crop", "64", "--batch", "2", "--steps", "2", "--warmup", "1",
                 "--precision", "32-true", "--baseline", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for job in ("dptune", "hf_trainer"):
        assert result[job]["images_per_s"] > 0 and result[job]["peak_mem_gib"] > 0
    ratio = result["dptune"]["images_per_s"] / result["hf_trainer"]["images_per_s"]
    assert result["ratio_vs_hf_trainer"] == pytest.approx(ratio)
    assert f"dptune / HF Trainer: {ratio:.2f}x" in capsys.readouterr().out


def test_the_loader_benchmark_skips_what_a_source_cannot_do_and_fails_on_errors(tmp_path, monkeypatch, capsys):
    """A synthetic source has no files for the PIL pipeline (an AttributeError row) nor for the disk
    cache (a DataError row); both are skipped, said, and a real failure makes the exit code 1 (it was 0)."""
    from conftest import REPO

    import dptune.tools.loader_bench as lb

    config = str(REPO / "configs" / "quickstart.yaml")
    base = {"data": config, "root": None, "samples": 2, "tmp": str(tmp_path)}
    assert "no image and mask files" in lb.time_loader({**base, "pipeline": "pil", "cache": False})["skipped"]
    assert "folder sources only" in lb.time_loader({**base, "pipeline": "dptune", "cache": "disk"})["skipped"]
    monkeypatch.setattr("dptune.tools.jobs.run_job", lambda job, opts: {"error": "DataError: broken"}
                        if opts["cache"] == "memory" else {"images_per_s": 10.0})
    assert main(["--data", config, "--samples", "2"]) == 1
    assert "dptune_cached" in capsys.readouterr().out


def test_a_model_config_that_cannot_be_used_is_one_line(tmp_path, capsys):
    """A ConfigError from the model config was a traceback (exit 1)."""
    (tmp_path / "typo.json").write_text('{"model_type": "dpt", "hidden_size": "32"}')
    for model, said in ((str(tmp_path / "missing.json"), "model config not found"),
                        (str(tmp_path / "typo.json"), "not a model config")):
        assert main(["--model", model, "--steps", "1"]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith(f"error: {model}") and said in err[0], err
