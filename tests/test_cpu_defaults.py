"""The CPU-defaults table tool refuses what it cannot measure in one line, before running anything."""

from __future__ import annotations

from dptune.tools import cpu_defaults


def test_a_missing_model_config_is_one_line(tmp_path, capsys):
    assert cpu_defaults.main(["--model", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model") and err.count("\n") == 1


def test_run_rows_without_a_camvid_layout_are_one_line(tmp_path, capsys):
    model = tmp_path / "m.json"
    model.write_text("{}")
    assert cpu_defaults.main(["--model", str(model), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --root {tmp_path}") and "train/" in err


def test_the_cpu_line_names_the_vector_extensions():
    name, flags = cpu_defaults.cpu_model()
    assert name
    assert all(f.startswith(("avx", "amx")) or f in ("fma", "f16c") for f in flags)
